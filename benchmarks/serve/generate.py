"""Greedy answers from a checkpoint folder, as a user would get them, in an engine we did not write.

Runs in the vLLM venv (benchmarks/serve/build_vllm_venv.sh), where tlq is not installed:
    python generate.py vllm OUT_DIR --data test.json --images DIR --num 200 --json answers.json
    python generate.py transformers OUT_DIR ...
`vllm`: vllm.LLM on the CPU backend, bfloat16 (its CPU WNA16 kernel has no float32 path).
`transformers`: plain AutoModelForImageTextToText / AutoProcessor.from_pretrained, float32. A quantized MoE
output stores one Linear per expert, which transformers merges into its fused experts only when told how:
for such a folder the conversion mapping docs/serving.md gives users is registered first (transformers' own
API, the docs' code run as written), where transformers' expert dequantizer reads the scheme (symmetric
weight-only); for the others (W8A8, W4A8, zero points) the MoE blocks are built with per-expert Linears
first (tlq.models.moe, imported from the repository's src/; the only tlq code on this side). The record
says which (`moe_loader`).
Writes {"engine", "loaded", "error", "answers": [...], "answer_tokens": [[ids]], "references", "seconds"} (and
"prompt_top1" with --prompt-top1; transformers with --answer-margins: "answer_margins", each generated
token's logit minus the runner-up's, which says whether two engines' answers parted on a near-tie); a load failure is
recorded, not raised, so the table can say what failed and why (the kernels vLLM picked are read from
its log by serve_check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


# The record's per-question lists: in the JSON file, not in the one-line summary printed for serve_check.py.
PER_QUESTION = ("answers", "answer_tokens", "references", "prompt_top1", "answer_margins")


def _questions(data: Path, images: Path, num: int):
    from PIL import Image

    rows = json.loads(data.read_text())[:num]
    for row in rows:
        question = row["conversations"][0]["value"].replace("<image>", "").strip()
        with Image.open(images / row["image"]) as image:
            yield question, image.convert("RGB"), row["conversations"][1]["value"]


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run_vllm(model: Path, questions, prompt_top1: bool = False, moe_backend: str = "auto") -> dict:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    extra = {} if moe_backend == "auto" else {"moe_backend": moe_backend}
    llm = LLM(model=str(model), dtype="bfloat16", max_model_len=1024, limit_mm_per_prompt={"image": 1},
              enforce_eager=True, seed=0, gpu_memory_utilization=0.25, **extra)
    processor = AutoProcessor.from_pretrained(str(model))
    requests = [{"prompt": _prompt(processor, q), "multi_modal_data": {"image": image}} for q, image, _ in questions]
    params = SamplingParams(temperature=0.0, max_tokens=16, prompt_logprobs=1 if prompt_top1 else None)
    outputs = llm.generate(requests, params)
    top1 = None
    if prompt_top1:  # per prompt position i >= 1: the most likely token given positions < i
        top1 = [[next(t for t, lp in position.items() if lp.rank == 1) for position in o.prompt_logprobs[1:]]
                for o in outputs]
    found = {"answers": [o.outputs[0].text.strip() for o in outputs],
             "answer_tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    return {**found, "prompt_top1": top1} if prompt_top1 else found


def run_transformers(model: Path, questions, prompt_top1: bool = False, causal_images: bool = False,
                     answer_margins: bool = False) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model))
    loading, moe_loader = _moe_loading(model)
    with loading:
        network = AutoModelForImageTextToText.from_pretrained(str(model), dtype=torch.float32).eval()
    found = {"answers": [], "answer_tokens": [], "prompt_top1": [], "answer_margins": []}
    found.update({"moe_loader": moe_loader} if moe_loader else {})
    with torch.no_grad():
        for question, image, _ in questions:
            inputs = processor(text=[_prompt(processor, question)], images=[image], return_tensors="pt")
            if causal_images:  # Gemma 3 attends bidirectionally within an image only where token types are given
                inputs.pop("token_type_ids", None)
            out = network.generate(**inputs, max_new_tokens=16, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
            tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
            found["answers"].append(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip())
            found["answer_tokens"].append(tokens.tolist())
            top2 = torch.stack(out.scores)[:, 0].float().topk(2, dim=-1).values  # [steps, 2]
            found["answer_margins"].append([round(m, 4) for m in (top2[:, 0] - top2[:, 1]).tolist()])
            if prompt_top1:
                found["prompt_top1"].append(network(**inputs).logits[0, :-1].argmax(-1).tolist())
    for key, asked in (("prompt_top1", prompt_top1), ("answer_margins", answer_margins)):
        if not asked:
            del found[key]
    return found


DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def docs_moe_mapping() -> str:
    """The code docs/serving.md gives users to load a quantized Qwen3-VL-MoE in plain transformers, without
    its from_pretrained line: it registers the per-expert merge for `qwen3_vl_moe`."""
    block = DOCS.read_text().split("<!-- moe-mapping:start -->")[1].split("<!-- moe-mapping:end -->")[0]
    code = block.split("```python\n")[1].split("```")[0]
    return "\n".join(line for line in code.splitlines() if not line.startswith("model = "))


def per_expert_moe(model: Path, config: dict | None = None) -> bool:
    """A Qwen3-VL-MoE folder whose experts are stored one Linear each (tlq's quantized outputs)."""
    config = config if config is not None else json.loads((model / "config.json").read_text())
    if config.get("model_type") != "qwen3_vl_moe":
        return False
    index = model / "model.safetensors.index.json"
    if index.is_file():
        keys = json.loads(index.read_text())["weight_map"]
    else:
        from safetensors import safe_open

        with safe_open(str(model / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
    return any(".mlp.experts.0." in k for k in keys)


def _moe_loading(model: Path):
    """(loading context, how the experts load) for `model`: nothing for dense and fused-FP folders; the docs'
    conversion mapping where transformers' expert dequantizer reads the scheme; else tlq.models.moe."""
    from contextlib import nullcontext

    config = json.loads((model / "config.json").read_text())
    if not per_expert_moe(model, config):
        return nullcontext(), None
    quantization = config.get("quantization_config", {})
    weights = [group.get("weights") or {} for group in quantization.get("config_groups", {}).values()]
    if quantization.get("format") == "pack-quantized" and all(w.get("symmetric") for w in weights):
        exec(docs_moe_mapping(), {})  # noqa: S102 - the repository's own docs, run as users are told to
        return nullcontext(), "transformers conversion mapping (docs/serving.md)"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from tlq.models import ADAPTERS
    from tlq.models.moe import routed_experts_as_linears

    return routed_experts_as_linears(ADAPTERS["qwen3_vl_moe"].experts), "tlq.models.moe"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["vllm", "transformers"])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--prompt-top1", action="store_true",
                        help="also record, per prompt position, the most likely next token (a loader check that "
                             "does not depend on the generated answers)")
    parser.add_argument("--answer-margins", action="store_true",
                        help="transformers: also record each generated token's logit margin over the runner-up")
    parser.add_argument("--causal-images", action="store_true",
                        help="transformers: causal attention over image tokens too (no token types), as vLLM's CPU "
                             "attention backend computes Gemma 3, which has no bidirectional image attention")
    parser.add_argument("--moe-backend", default="auto",
                        help="vLLM's fused-experts backend (e.g. emulation where its CPU int4 MoE kernel, which "
                             "needs AMX, cannot run)")
    args = parser.parse_args()
    start = time.perf_counter()
    record = {"engine": args.engine, "model": str(args.model), "loaded": False, "error": None, "answers": []}
    try:
        questions = list(_questions(args.data, args.images, args.num))
        if args.engine == "vllm":
            record.update(run_vllm(args.model, questions, args.prompt_top1, args.moe_backend))
        else:
            record.update(run_transformers(args.model, questions, args.prompt_top1, args.causal_images,
                                           args.answer_margins))
        record["loaded"] = True
        record["references"] = [answer for _, _, answer in questions]
    except Exception as exc:  # noqa: BLE001 - the failure is the measurement
        lines = [line for line in str(exc).splitlines() if line.strip()]
        record["error"] = f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]
    record["seconds"] = round(time.perf_counter() - start, 1)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in PER_QUESTION}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
