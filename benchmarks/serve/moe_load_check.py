"""Do vLLM's own MoE loader and dequantizer read tlq's quantized experts as the weights tlq calibrated?

    .venv/bin/python benchmarks/serve/moe_load_check.py [--scheme W4A16] [--asymmetric] [--control] [--dtype float32]
    .venv/bin/python benchmarks/serve/moe_load_check.py --serve 16 [--asymmetric] [--control]

vLLM 0.32 has no CPU kernel for int4 MoE layers without AMX (docs/serving.md), so the serving check cannot
run tlq's quantized Qwen3-VL-MoE experts here. This check runs every vLLM step before the kernel:
1. tlq venv: a tiny random Qwen3-VL-MoE (benchmarks/serve/serve_check.py's `tiny-qwen3_vl_moe`) is quantized
   by `tlq quantize` as a user would; plain transformers 5.24 with compressed-tensors (`tlq.compat.load_quantized`,
   the reload tlq's tests compare logits on) gives each expert Linear's dequantized weight: what tlq meant.
2. vLLM venv: `vllm.LLM` builds Qwen3VLMoeForConditionalGeneration from that checkpoint with its
   compressed-tensors config, its weight loader maps each `mlp.experts.{e}.{gate,up,down}_proj.weight_packed`
   / `weight_scale` / `weight_shape` into the fused w13 / w2 buffers, and its WNA16 MoE method converts them
   with the EMULATION backend's dequantization (`_process_weights_emulation_gptq`: int4 -> bf16, vLLM's
   code). The patches, all listed in the results: the emulation backend first in the CPU's backend order
   and allowed on the CPU platform (it is CUDA-only because its matmuls are Triton), and the run stopped
   right after the weights are converted, before any forward (there the Triton kernel would be needed).
3. Every expert's vLLM w13[e] = [gate; up] and w2[e] = down are compared with tlq's, and the routers
   (`mlp.gate`, FP, in `ignore`) with the checkpoint's.
`--serve N` goes on to answers: the dequantized bfloat16 experts are handed to vLLM's unquantized MoE method
(its CPU experts kernel; what the emulation backend does on a GPU with Triton), benchmarks/serve/generate.py
runs vLLM's greedy generation on N held-out questions in the same process, and the answers and per-prompt-
position top-1 tokens are compared with plain transformers on the same checkpoint (serve_check.py's run),
beside the two engines' agreement on the FP checkpoint. `--control` serves the planted layout error instead.
What it does not check: vLLM's int4 MoE kernels (Marlin on a GPU, CPUExpertsInt4 on an AMX CPU) computing
with those weights. Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TLQ_PY = ROOT / ".venv" / "bin" / "python"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = "tiny-qwen3_vl_moe"

# Step 1, in tlq's venv: the expert and router weights as transformers + compressed-tensors reload them.
_TLQ_SIDE = r"""
import sys, re, torch
from safetensors.torch import save_file
from compressed_tensors.compressors.base import decompress_module
from tlq.compat import load_quantized
model = load_quantized(sys.argv[1], dtype=torch.float32)
out = {}
for name, module in model.named_modules():
    m = re.search(r"layers\.(\d+)\.mlp\.(experts\.\d+\.(?:gate|up|down)_proj|gate)$", name)
    if m is None:
        continue
    decompress_module(module, leave_decompressed=False)  # compressed-tensors' unpacking, as its forward does
    weight = module.weight
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise SystemExit(f"{name}: weight is {weight.dtype}; expected a dequantized float weight")
    out[f"{m.group(1)}.{m.group(2)}"] = weight.detach().float().contiguous()
save_file(out, sys.argv[2])
print(len(out))
"""

# Step 2, in the vLLM venv: what both modes patch, and vLLM's own dequantization of one MoE layer.
_VLLM_EMULATION = r"""
import json, os, re, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, so the patches apply
import torch
from vllm.model_executor.layers.fused_moe.oracle import int_wna16
from vllm.model_executor.layers.fused_moe.experts import int4_emulation_moe
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
    compressed_tensors_moe_wna16 as wna16)

PATCHES = ["WNA16 MoE backend order on CPU: [EMULATION] (was [ZEN_CPU, CPU])",
           "Int4EmulationTritonExperts._supports_current_device: True on CPU"]
int_wna16._get_priority_backends = lambda: [int_wna16.WNA16MoEBackend.EMULATION]
int4_emulation_moe.Int4EmulationTritonExperts._supports_current_device = staticmethod(lambda: True)
converted, backends = [], []

def dequantized(method, layer):
    backends.append(method.wna16_backend.value)
    out = int_wna16.convert_to_wna16_moe_kernel_format(backend=method.wna16_backend, layer=layer,
        quant_config=method.weight_quant, input_dtype=method.input_dtype, w13=layer.w13_weight_packed,
        w2=layer.w2_weight_packed, w13_scale=layer.w13_weight_scale, w2_scale=layer.w2_weight_scale,
        w13_qzeros=getattr(layer, "w13_weight_zero_point", None),
        w2_qzeros=getattr(layer, "w2_weight_zero_point", None), w13_bias=None, w2_bias=None)
    return out[0], out[1], getattr(layer, "w13_weight_zero_point", None) is not None
"""

_VLLM_SIDE = _VLLM_EMULATION + r"""
from safetensors.torch import load_file
PATCHES.append("CompressedTensorsWNA16MoEMethod.process_weights_after_loading: vLLM's own conversion, then the "
               "converted w13 / w2 are kept and the run stops before any forward")

class Converted(Exception):
    pass

def keep(self, layer):
    w13, w2, zero_points = dequantized(self, layer)
    converted.append((layer.layer_name, w13.float(), w2.float(), zero_points))

wna16.CompressedTensorsWNA16MoEMethod.process_weights_after_loading = keep
routers = {}
from vllm.model_executor.model_loader import base_loader
original_load = base_loader.BaseModelLoader.load_model

def load_then_stop(self, vllm_config, model_config, prefix=""):
    loader_load_weights = self.load_weights

    def load_weights(model, model_config):  # the routers as loaded (the CPU's processing may repack them after)
        loader_load_weights(model, model_config)
        for name, param in model.named_parameters():
            m = re.search(r"layers\.(\d+)\.mlp\.gate\.weight$", name)
            if m:
                routers[m.group(1)] = param.detach().float().clone()

    self.load_weights = load_weights
    original_load(self, vllm_config, model_config, prefix)  # create, load_weights, process (patched above)
    raise Converted()

base_loader.BaseModelLoader.load_model = load_then_stop
from vllm import LLM
try:
    LLM(model=sys.argv[1], dtype=sys.argv[3], max_model_len=1024, enforce_eager=True, seed=0,
        limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.25)  # generate.py's settings
    raise SystemExit("the engine started: the stop after conversion did not happen")
except Converted:
    pass
tlq = load_file(sys.argv[2])
experts = sorted({int(k.split(".")[2]) for k in tlq if ".experts." in k})
rows = []
for layer_name, w13, w2, zero_points in converted:
    layer = re.search(r"layers\.(\d+)\.", layer_name).group(1)
    inter = tlq[f"{layer}.experts.0.gate_proj"].shape[0]
    diffs = {"gate": [], "up": [], "down": []}
    rounded = []  # vLLM's emulation dequantizes to bfloat16: against tlq's weights rounded once to bfloat16
    for e in experts:
        for part, in_vllm in (("gate", w13[e, :inter]), ("up", w13[e, inter:]), ("down", w2[e])):
            meant = tlq[f"{layer}.experts.{e}.{part}_proj"]
            diffs[part].append((in_vllm - meant).abs().max().item())
            rounded.append((in_vllm - meant.bfloat16().float()).abs().max().item())
    scale = max(tlq[f"{layer}.experts.{e}.{p}_proj"].abs().max().item() for e in experts for p in ("gate", "up", "down"))
    # The expert a vLLM slot holds, found by nearest tlq weight: a mix-up of experts shows as slot != expert.
    slots = [min(experts, key=lambda j: (w2[e] - tlq[f"{layer}.experts.{j}.down_proj"]).abs().max().item())
             for e in experts]
    rows.append({"layer": int(layer), "zero_points": zero_points, "experts": len(experts), "w13": list(w13.shape),
                 "w2": list(w2.shape),
                 "max_abs_diff": {k: max(v) for k, v in diffs.items()}, "largest_weight": scale,
                 "max_abs_diff_to_bf16_rounded": max(rounded),
                 "slot_is_expert": slots == experts,
                 "router_max_abs_diff": (routers[layer] - tlq[f"{layer}.gate"]).abs().max().item()})
print(json.dumps({"patches": PATCHES, "backends": sorted(set(backends)), "layers": rows}))
"""


# Serve mode, in the vLLM venv: the dequantized experts handed to vLLM's unquantized MoE method (its CPU
# experts kernel), then benchmarks/serve/generate.py's vLLM run in this process.
_VLLM_SERVE = _VLLM_EMULATION + r"""
import runpy
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
PATCHES.append("CompressedTensorsWNA16MoEMethod.process_weights_after_loading: vLLM's own conversion, then the "
               "bfloat16 experts are served by vLLM's UnquantizedFusedMoEMethod (as its emulation backend "
               "serves them with Triton on a GPU)")

def serve_dequantized(self, layer):
    w13, w2, _ = dequantized(self, layer)
    for name in [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(("w13_", "w2_"))]:
        delattr(layer, name)
    layer.register_parameter("w13_weight", torch.nn.Parameter(w13.to(torch.bfloat16), requires_grad=False))
    layer.register_parameter("w2_weight", torch.nn.Parameter(w2.to(torch.bfloat16), requires_grad=False))
    unquantized = UnquantizedFusedMoEMethod(layer.moe_config)
    layer._replace_quant_method(unquantized)
    unquantized.process_weights_after_loading(layer)

wna16.CompressedTensorsWNA16MoEMethod.process_weights_after_loading = serve_dequantized
generate = sys.argv[1]
sys.argv = [generate, *sys.argv[2:]]
try:
    runpy.run_path(generate, run_name="__main__")
except SystemExit as exit:
    if exit.code not in (0, None):
        raise
print(json.dumps({"patches": PATCHES, "backends": sorted(set(backends))}))
"""


def serve(out: Path, label: str, fp: Path, num: int, control: bool = False) -> dict:
    """vLLM (dequantized experts) and transformers on the same checkpoint; the FP checkpoint in vLLM. With
    `control`, vLLM serves the copy with the planted layout error and transformers the checkpoint itself."""
    import serve_check

    work = serve_check.WORK / MODEL
    served = plant_layout_error(out) if control else out
    answers = work / f"{served.name}.vllm-emulated.json"  # bfloat16: vLLM's CPU WNA16 Linears have no float32
    if not answers.is_file():
        proc = subprocess.run([str(VLLM_PY), "-c", _VLLM_SERVE, str(serve_check.GENERATE), "vllm", str(served), "--data",
                               str(serve_check.DATA / "test.json"), "--images", str(serve_check.DATA), "--num",
                               str(num), "--json", str(answers), "--prompt-top1"], capture_output=True, text=True,
                              timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0 or not answers.is_file():
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"error: the vLLM serve side failed (exit {proc.returncode})")
        patches = json.loads(proc.stdout.strip().splitlines()[-1])
        record = json.loads(answers.read_text())
        answers.write_text(json.dumps({**record, **patches}, indent=1) + "\n")
    record = json.loads(answers.read_text())
    if not record.get("loaded"):
        raise SystemExit(f"error: vLLM did not serve the dequantized experts: {record.get('error')}")
    transformers = serve_check._run_engine("transformers", out, num, work / f"{out.name}.transformers.json", True)
    fp_vllm = serve_check._run_engine("vllm", fp, num, work / "fp.vllm.json", True)
    fp_transformers = serve_check._run_engine("transformers", fp, num, work / "fp.transformers.json", True)
    return {"model": MODEL, "scheme": label + (" (control: vLLM serves the planted layout error)" if control else ""),
            "questions": num, "patches": record["patches"],
            "backends": record["backends"], "vllm_dtype": "bfloat16",
            "vllm_vs_transformers": serve_check._engines_agree(answers, work / f"{out.name}.transformers.json"),
            "where_answers_part": serve_check._divergences(answers, work / f"{out.name}.transformers.json"),
            "where_fp_answers_part": serve_check._divergences(work / "fp.vllm.json", work / "fp.transformers.json"),
            "fp_vllm_vs_fp_transformers": serve_check._engines_agree(work / "fp.vllm.json", work / "fp.transformers.json"),
            "vllm_agrees_with_fp": serve_check._agreement(record, fp_vllm).get("agrees_with_fp"),
            "transformers_agrees_with_fp": serve_check._agreement(transformers, fp_transformers).get("agrees_with_fp")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="W4A16", help="tlq quantize --scheme (vLLM's WNA16 MoE path: W4A16)")
    parser.add_argument("--asymmetric", action="store_true", help="tlq quantize --no-symmetric (zero points)")
    parser.add_argument("--dtype", default="float32",
                        help="vLLM's model dtype: float32 keeps the routers exact; the experts are bfloat16 either way "
                             "(the emulation backend dequantizes to bfloat16)")
    parser.add_argument("--control", action="store_true",
                        help="check a copy of the checkpoint with a planted layout error instead (layer 0: experts 0 "
                             "and 1 trade names; layer 1: expert 2's gate and up trade names): the check must fail")
    parser.add_argument("--serve", type=int, default=0, metavar="N",
                        help="instead: serve N held-out questions in vLLM with the experts as its emulation backend "
                             "dequantizes them (run by its unquantized CPU MoE method) and in transformers, and "
                             "compare answers and prompt positions")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/serve/moe_load/<scheme>[-control]")
    args = parser.parse_args()
    for python in (TLQ_PY, VLLM_PY):
        if not python.is_file():
            raise SystemExit(f"error: {python} is missing; run `make venv` and "
                             "`bash benchmarks/serve/build_vllm_venv.sh .venv-vllm` first")
    sys.path.insert(0, str(HERE))
    import serve_check

    fp = serve_check.model_dir(MODEL)
    options = ["--scheme", args.scheme] + (["--no-symmetric"] if args.asymmetric else [])
    label = args.scheme + (" asymmetric" if args.asymmetric else "")
    out = serve_check.WORK / MODEL / ("moe-load-" + label.lower().replace(" ", "-"))
    info = serve_check._quantize(MODEL, label, options, out)
    if not info["quantized"]:
        raise SystemExit(f"error: tlq quantize failed: {info.get('error')}")
    reference = out.parent / f"{out.name}.tlq-weights.safetensors"
    subprocess.run([str(TLQ_PY), "-c", _TLQ_SIDE, str(out), str(reference)], check=True, timeout=600)
    if args.serve:
        result = serve(out, label, fp, args.serve, args.control)
        args.out = args.out or ROOT / "benchmarks" / "results" / "serve" / "moe_load" / (
            label.lower().replace(" ", "-") + "-served" + ("-control" if args.control else ""))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "table.md").write_text(served_markdown(result))
        print(served_markdown(result))
        return 0
    if args.control:
        out = plant_layout_error(out)
        label += " (control: planted layout error)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([str(VLLM_PY), "-c", _VLLM_SIDE, str(out), str(reference), args.dtype], capture_output=True,
                          text=True, timeout=900, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"error: the vLLM side failed (exit {proc.returncode})")
    result = {"model": MODEL, "scheme": label, "vllm_dtype": args.dtype, "checkpoint": str(out.relative_to(ROOT)),
              **json.loads(proc.stdout.strip().splitlines()[-1])}
    slug = label.lower().split(" (")[0].replace(" ", "-") + ("-control" if args.control else "")
    args.out = args.out or ROOT / "benchmarks" / "results" / "serve" / "moe_load" / slug
    result["layout_ok"] = all(layout_ok(row) for row in result["layers"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "table.md").write_text(markdown(result))
    print(markdown(result))
    if result["layout_ok"] == args.control:  # a control that passes means the check cannot see a layout error
        print(f"error: layout_ok is {result['layout_ok']} {'with' if args.control else 'without'} the planted error",
              file=sys.stderr)
        return 1
    return 0


BF16_TOLERANCE = 2.0**-7  # vLLM's emulation dequantizes in bfloat16 (scales rounded, then the product): two roundings


def layout_ok(row: dict) -> bool:
    """Every expert in its own slot, each weight within bfloat16 rounding of tlq's, the router unchanged
    (exact when vLLM's dtype is float32, the default; bfloat16 rounding otherwise)."""
    tolerance = BF16_TOLERANCE * row["largest_weight"]
    return (row["slot_is_expert"] and max(row["max_abs_diff"].values()) <= tolerance
            and row["router_max_abs_diff"] <= tolerance)


def plant_layout_error(checkpoint: Path) -> Path:
    """A copy of `checkpoint` whose tensors carry wrong names: what a layout bug in the export would write."""
    from safetensors.torch import load_file, save_file

    copy = checkpoint.parent / f"{checkpoint.name}-control"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(checkpoint, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    renames = {}
    for key in tensors:
        if ".layers.0.mlp.experts.0." in key or ".layers.0.mlp.experts.1." in key:
            renames[key] = key.replace("experts.0.", "experts.@.").replace("experts.1.", "experts.0.").replace(
                "experts.@.", "experts.1.")
        elif ".layers.1.mlp.experts.2." in key and ("gate_proj" in key or "up_proj" in key):
            renames[key] = key.replace("gate_proj", "@").replace("up_proj", "gate_proj").replace("@", "up_proj")
    save_file({renames.get(k, k): v for k, v in tensors.items()}, str(copy / "model.safetensors"),
              metadata={"format": "pt"})
    return copy


def served_markdown(result: dict) -> str:
    same, fp = result["vllm_vs_transformers"], result["fp_vllm_vs_fp_transformers"]
    return "\n".join([
        f"{result['model']} quantized by tlq ({result['scheme']}), {result['questions']} held-out questions, greedy: "
        "vLLM CPU (bfloat16) with the experts as vLLM's emulation backend dequantizes them, run by its "
        "unquantized MoE method, against plain transformers (float32) on the same checkpoint.", "",
        "Patches: " + "; ".join(result["patches"]) + ".", "",
        "| checkpoint | answers equal, vLLM = transformers | prompt positions with equal top-1 | vLLM = FP | "
        "transformers = FP |", "|---|---|---|---|---|",
        f"| {result['scheme']} | {same['answers']:.3f} | {same['prompt_top1']:.3f} ({same['prompt_positions']}) | "
        f"{result['vllm_agrees_with_fp']:.3f} | {result['transformers_agrees_with_fp']:.3f} |",
        f"| FP (the same two engines) | {fp['answers']:.3f} | {fp['prompt_top1']:.3f} ({fp['prompt_positions']}) | "
        "1 | 1 |"] + parting_lines(result)) + "\n"


def parting_lines(result: dict) -> list[str]:
    """Where vLLM's and transformers' answers part, and how close transformers' choice was there."""
    lines = []
    for label, key in ((result["scheme"], "where_answers_part"), ("FP", "where_fp_answers_part")):
        found = result.get(key)
        if not found:
            continue
        if not lines:
            lines = ["", "Where the answers part (first differing generated token; margin: transformers' chosen "
                     "logit minus the runner-up's there; rank: the share of all its generated steps with a smaller "
                     "margin):", "", "| checkpoint | answers that part | at step | margin there | rank of that margin | "
                     "median margin, all steps |", "|---|---|---|---|---|---|"]
        parted = found["parted"]
        cells = lambda key, form: ", ".join(format(p[key], form) for p in parted) or "-"  # noqa: E731
        lines.append(f"| {label} | {len(parted)} | {cells('step', 'd')} | {cells('margin', '.2f')} | "
                     f"{cells('margin_rank', '.2f')} | {found['median_margin']:.2f} ({found['steps']} steps) |")
    return lines


def markdown(result: dict) -> str:
    lines = [f"{result['model']} quantized by tlq ({result['scheme']}), loaded and dequantized by vLLM's own MoE "
             f"code (backend {', '.join(result['backends'])}, model dtype {result['vllm_dtype']}), against tlq's reload in transformers "
             "(max |difference|, float32).", "", "Patches: " + "; ".join(result["patches"]) + ".", "",
             "| layer | experts | zero points loaded | vLLM w13 / w2 | gate | up | down | largest weight | all, against tlq's rounded to "
             "bfloat16 | slot e holds expert e | router (FP) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["layers"]:
        d = row["max_abs_diff"]
        lines.append(f"| {row['layer']} | {row['experts']} | {'yes' if row['zero_points'] else 'no'} | {row['w13']} / {row['w2']} | {d['gate']:.3g} | "
                     f"{d['up']:.3g} | {d['down']:.3g} | {row['largest_weight']:.3g} | "
                     f"{row['max_abs_diff_to_bf16_rounded']:.3g} | "
                     f"{'yes' if row['slot_is_expert'] else 'NO'} | {row['router_max_abs_diff']:.3g} |")
    verdict = "**layout as tlq meant it**" if result["layout_ok"] else "**layout error**"
    return "\n".join(lines) + f"\n\nVerdict (each weight within 2^-7 of the largest, every expert in its slot): {verdict}\n"


if __name__ == "__main__":
    raise SystemExit(main())
