"""Quantize a checkpoint with llm-compressor 0.14 on tlq's calibration samples (runs in .venv-llmc).

    .venv-llmc/bin/python benchmarks/peers/llmc_quantize.py --model DIR --samples FILE.safetensors \
        --recipe gptq|awq|awq_gptq|smoothquant_gptq --scheme '{"weight_bits": 3, ...}' \
        --ignore '["lm_head", "re:visual.*"]' --layer-class Qwen2VLDecoderLayer --out DIR

The samples are the exact model inputs tlq calibrates on (benchmarks/peers/samples.py writes them), fed
through a DataLoader, so llm-compressor sees the same tokens and pixels. The recipes are llm-compressor's
own documented ones: GPTQ with static activation ordering (its default), AWQ (duo scaling, its default)
followed by round-to-nearest or by GPTQ, SmoothQuant (strength 0.8, as in its W8A8 example) followed by
GPTQ. The only change to llm-compressor is below (`_no_pinning_without_accelerator`). Writes the
compressed checkpoint (model weights and config; the driver adds the processor files) and peer.json
with versions and the recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _no_pinning_without_accelerator() -> None:
    """AWQ pins its cached activations for faster host-to-device copies; without an accelerator
    `Tensor.pin_memory` raises "Cannot access accelerator device". Pinning changes no value, so on a
    machine without one it is skipped."""
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines import cache

    cache.IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _config_groups(scheme: dict) -> dict:
    weights = {"num_bits": scheme["weight_bits"], "type": "int", "symmetric": scheme["symmetric"],
               "strategy": "group" if scheme.get("group_size") else "channel"}
    if scheme.get("group_size"):
        weights["group_size"] = scheme["group_size"]
    group = {"targets": ["Linear"], "weights": weights}
    if scheme.get("act_bits"):
        group["input_activations"] = {"num_bits": scheme["act_bits"], "type": "int", "symmetric": True,
                                      "strategy": "token", "dynamic": True}
    return {"group_0": group}


def _scoped_mappings(scope: str | None):
    """llm-compressor's default AWQ and SmoothQuant mappings, limited to modules under `scope` (a regex).

    Its defaults match `.*q_proj$` anywhere; in LLaVA-OneVision the SigLIP tower has q/k/v_proj too, and
    AWQ then stops ("AWQ needs to match a single smoothlayer for each mapping"). The same mappings limited
    to the language model are what a user of that model has to pass. None keeps the defaults."""
    if scope is None:
        return None, None
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping, default_mappings
    from llmcompressor.modifiers.transform.smoothquant.utils import DEFAULT_SMOOTHQUANT_MAPPINGS

    def scoped(pattern: str) -> str:
        return f"re:{scope}{pattern[3:]}" if pattern.startswith("re:.*") else pattern

    awq = [AWQMapping(scoped(m.smooth_layer), [scoped(b) for b in m.balance_layers]) for m in default_mappings]
    smooth = [[[scoped(b) for b in m.balance_layers], scoped(m.smooth_layers)] for m in DEFAULT_SMOOTHQUANT_MAPPINGS]
    return awq, smooth


def _recipe(name: str, scheme: dict, ignore: list[str], scope: str | None = None) -> list:
    from llmcompressor.modifiers.transform.awq import AWQModifier  # the transform; the old path is a shim
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    awq_mappings, smooth_mappings = _scoped_mappings(scope)

    # Each modifier gets its own config dict: a modifier's validation may consume the one it is given.
    def gptq():
        return GPTQModifier(config_groups=_config_groups(scheme), ignore=list(ignore), actorder="static")

    recipes = {
        "gptq": lambda: [gptq()],
        "awq": lambda: [AWQModifier(mappings=awq_mappings),
                        QuantizationModifier(config_groups=_config_groups(scheme), ignore=list(ignore))],
        "awq_gptq": lambda: [AWQModifier(mappings=awq_mappings), gptq()],
        "smoothquant_gptq": lambda: [SmoothQuantModifier(smoothing_strength=0.8, mappings=smooth_mappings), gptq()],
    }
    if name not in recipes:
        raise SystemExit(f"unknown recipe {name!r}: use one of {sorted(recipes)}")
    return recipes[name]()


def _loader(path: str):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        count = int(f.metadata()["samples"])
        batches = [{} for _ in range(count)]
        for key in f.keys():
            index, name = key.split("/", 1)
            batches[int(index)][name] = f.get_tensor(key)
    for batch in batches:
        batch.pop("labels", None)  # calibration runs the forward only
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--scheme", required=True, help="tlq's Scheme.to_dict() as JSON")
    parser.add_argument("--ignore", required=True, help="JSON list of llm-compressor ignore entries")
    parser.add_argument("--layer-class", required=True, help="the decoder layer class (sequential target)")
    parser.add_argument("--scope", default=None,
                        help="regex prefix limiting AWQ/SmoothQuant mappings to the language model (LLaVA-OneVision)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    _no_pinning_without_accelerator()
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot

    scheme, ignore = json.loads(args.scheme), json.loads(args.ignore)
    model = transformers.AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    loader = _loader(args.samples)
    # llm-compressor wants a processor whenever data is given; the samples are already rendered, so the
    # tokenizer stands in (the full processor needs torchvision for its video part).
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    import time

    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=loader, recipe=_recipe(args.recipe, scheme, ignore, args.scope),
            num_calibration_samples=len(loader.dataset), sequential_targets=[args.layer_class])
    calibration_seconds = time.perf_counter() - start  # oneshot: its pipeline, calibration and compression
    out = Path(args.out)
    model.save_pretrained(out, save_compressed=True)
    (out / "peer.json").write_text(json.dumps({
        "peer": "llm-compressor", "calibration_seconds": round(calibration_seconds, 3), "recipe": args.recipe, "scheme": scheme, "ignore": ignore, "scope": args.scope,
        "versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                     "compressed-tensors": compressed_tensors.__version__, "torch": torch.__version__}},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
