"""Quantize a checkpoint with AutoRound 0.16 on tlq's calibration samples (runs in .venv-autoround).

    .venv-autoround/bin/python benchmarks/peers/autoround_quantize.py --model DIR --samples FILE.safetensors \
        --scheme '{"weight_bits": 3, "group_size": 128, "symmetric": true, "act_bits": null}' --out DIR

AutoRound (SignRound: signed-gradient descent on the rounding offsets and the weight ranges, block by
block) with its defaults (200 iterations, learning rate 1/iters), weight-only. The samples are tlq's
rendered records (benchmarks/peers/samples.py) in a DataLoader, which AutoRound forwards as given.
The language model's decoder Linears are quantized; the vision tower and projector are left alone, as
in tlq. The output is written in llm-compressor's (compressed-tensors) format so that the same loader
and evaluator score it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llmc_quantize import _loader  # noqa: E402  (the same sample reader; no llm-compressor import)


def _flatten(out: Path) -> None:
    """AutoRound writes into OUT/<model>-w<bits>g<group>/; the driver expects the checkpoint in OUT."""
    inner = [p for p in out.iterdir() if p.is_dir() and (p / "config.json").exists()]
    if len(inner) == 1 and not (out / "config.json").exists():
        for item in inner[0].iterdir():
            item.rename(out / item.name)
        inner[0].rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--scheme", required=True, help="tlq's Scheme.to_dict() as JSON")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    scheme = json.loads(args.scheme)
    if scheme.get("act_bits"):
        raise SystemExit("AutoRound runs weight-only schemes here (its W*A8 paths need an accelerator)")
    import auto_round
    import transformers
    from auto_round import AutoRound

    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    # AutoRound asserts that a processor is given, but forwards ready samples without using it; the stock
    # processor would need torchvision (for its video part), so the image processor stands in.
    processor = transformers.AutoImageProcessor.from_pretrained(args.model)
    loader = _loader(args.samples)
    rounder = AutoRound(model, tokenizer=tokenizer, processor=processor, scheme="W4A16", bits=scheme["weight_bits"],
                        group_size=scheme["group_size"] or -1, sym=scheme["symmetric"], dataset=loader,
                        nsamples=len(loader.dataset), iters=args.iters, batch_size=1, device_map="cpu", seed=0,
                        amp=False)  # float32 throughout, as tlq and llm-compressor run here
    rounder.quantize_and_save(args.out, format="llm_compressor")
    _flatten(Path(args.out))
    (Path(args.out) / "peer.json").write_text(json.dumps({
        "peer": "AutoRound", "iters": args.iters, "scheme": scheme,
        "versions": {"auto-round": auto_round.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
