"""Calibration cost at real Qwen2-VL widths, tlq and llm-compressor side by side, one job at a time.

    .venv/bin/python benchmarks/cost.py --shape 2b [--layers 28] [--samples 128] [--repeats 3] \
        [--methods gptq,tlq,awq,llmc:gptq,llmc:awq_gptq] [--out benchmarks/results/cost/2b-28l-128]
    (a tlq method may carry knobs as in tlq bench: tlq+scale-rescore-top=4)

Builds a random-weight Qwen2VLForConditionalGeneration with the text widths of the published config
(tests/fixtures/configs/qwen2-vl-{2b,7b}-instruct: hidden, MLP, heads, KV heads; `--layers` of them), a
small vision tower (its cost is not what is compared) and the word-level reference tokenizer (so the
LM head is small: the real 152k vocabulary would add to TLQ's gradient pass). Calibration records are
`tlq synth --condition background` scenes: 256 image tokens plus a prompt and answer, ~280 tokens each.
Every method quantizes the same samples (benchmarks/peers/samples.py) as a child process, measured by
tlq.measure (wall, own peak RSS); tlq's runs also report their phase breakdown (tlq_recipe.json).
Writes results.json and table.md (ratios to llm-compressor) under --out; say in the README whether the
machine was idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIGS = {"2b": "qwen2-vl-2b-instruct", "7b": "qwen2-vl-7b-instruct"}


def build_checkpoint(folder: Path, shape: str, layers: int) -> dict:
    import torch

    from tlq.data.synthetic import vocabulary
    from tlq.reference.checkpoint import ModelSize, build_model_and_processor, save_checkpoint

    config = json.loads((ROOT / "tests" / "fixtures" / "configs" / CONFIGS[shape] / "config.json").read_text())
    text = config.get("text_config", config)
    def value(key):
        return text.get(key, config.get(key))
    size = ModelSize(hidden=value("hidden_size"), intermediate=value("intermediate_size"), layers=layers,
                     heads=value("num_attention_heads"), kv_heads=value("num_key_value_heads"),
                     vision_hidden=64, vision_layers=1, vision_heads=2, patch=8, image_size=256)
    torch.manual_seed(0)
    model, processor = build_model_and_processor("qwen2_vl", vocabulary(), size, seed=0)
    save_checkpoint(model, processor, folder)
    return {"hidden": size.hidden, "intermediate": size.intermediate, "layers": layers, "heads": size.heads,
            "kv_heads": size.kv_heads, "parameters": sum(p.numel() for p in model.parameters())}


def command(method: str, checkpoint: Path, data: Path, samples: Path, count: int, out: Path) -> list[str]:
    from run import llmc_command

    from tlq.recipe import parse_scheme

    if method.startswith("llmc:"):
        return llmc_command(method, str(checkpoint), samples, parse_scheme("W4A16"), "qwen2_vl", "Qwen2VLDecoderLayer", out)
    from tlq.bench import parse_method_spec

    name, flags = parse_method_spec(method)  # tlq+scale-rescore-top=4: a method with its knobs, as in tlq bench
    return [sys.executable, "-m", "tlq", "quantize", str(checkpoint), "--out", str(out), "--calib",
            str(data / "calib.json"), "--images", str(data), "--method", name, "--scheme", "W4A16",
            "--num-samples", str(count), "--seed", "0", "--device", "cpu", "--quiet", "--no-resume", "--overwrite",
            *flags]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(CONFIGS), default="2b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="gptq,tlq,awq,llmc:gptq,llmc:awq_gptq")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "cost")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/cost/<shape>-<layers>l-<samples>; the "
                             "folder above holds benchmarks/cost_summary.py's table of the runs that count)")
    parser.add_argument("--plans-only", action="store_true",
                        help="run nothing: add tlq plan's estimate beside the rows --out already holds")
    args = parser.parse_args()
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / "cost" / f"{args.shape}-{args.layers or 28}l-{args.samples}"
    from samples import write_samples

    from tlq.bench import run_measured
    from tlq.data.synthetic import write_split

    if args.plans_only:  # the folder's own run settings, so the rewritten table describes the same runs
        saved_run = json.loads((args.out / "results.json").read_text())
        args.shape, args.samples, args.repeats = saved_run["shape"], saved_run["samples"], saved_run["repeats"]
        args.layers = saved_run["model"]["layers"]
    layers = args.layers or 28
    work = args.work / f"{args.shape}-{layers}l"
    checkpoint, data = work / "model", work / "data"
    if not (checkpoint / "config.json").exists():
        shape = build_checkpoint(checkpoint, args.shape, layers)
        (work / "shape.json").write_text(json.dumps(shape))
    shape = json.loads((work / "shape.json").read_text())
    if not (data / "calib.json").exists():
        write_split(data, max(args.samples, 128), seed=1, name="calib", condition="background")
    samples = write_samples(str(checkpoint), str(data / "calib.json"), str(data), args.samples, 0,
                            work / f"samples-{args.samples}.safetensors")
    # Rows of methods not run now are kept, so one method can be rerun into a table beside the others.
    saved = args.out / "results.json"
    requested = set() if args.plans_only else set(args.methods.split(","))
    rows = [r for r in json.loads(saved.read_text())["rows"] if r["method"] not in requested] if saved.exists() else []
    for repeat in range(0 if args.plans_only else args.repeats):
        for method in args.methods.split(","):
            out = work / f"out-{method.replace(':', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            measured = run_measured(command(method, checkpoint, data, samples, args.samples, out), method)
            row = {"method": method, "repeat": repeat, **measured, "load_average": os.getloadavg()[0]}
            recipe, peer = out / "tlq_recipe.json", out / "peer.json"
            if recipe.exists():
                saved = json.loads(recipe.read_text())
                row["phase_seconds"] = saved.get("phase_seconds")
                row["calibration_seconds"] = saved.get("calibration_seconds")
                row["phase_peak_rss_mib"] = saved.get("phase_peak_rss_mib")
                groups = [g for layer in saved.get("rescaled_groups", []) for g in layer if "block_runs" in g]
                if groups:  # the scale search's block forwards, run and of full scoring (its bound's saving)
                    row["block_runs"] = [sum(g["block_runs"] for g in groups), sum(g["block_runs_full"] for g in groups)]
            elif peer.exists():
                row["calibration_seconds"] = json.loads(peer.read_text()).get("calibration_seconds")
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
            write(args, shape, rows)  # after every job, so an interrupted run keeps what it measured
    if add_plans(rows, checkpoint, samples, args.samples):  # after the timed jobs: it runs a process of its own
        write(args, shape, rows)
    return 0


def add_plans(rows: list[dict], checkpoint: Path, samples: Path, count: int) -> bool:
    """`tlq plan`'s estimate for one CPU process (+ the interpreter's own peak, which the plan leaves out)
    beside each tlq row that has none: its measured peak against it (benchmarks/cost_curves.py counts the
    same terms). A method with knobs is left out: the plan reads the method's defaults."""
    from cost_curves import interpreter_baseline_mib, planned_mib
    from safetensors import safe_open

    from tlq.recipe import METHODS

    missing = [r for r in rows if r["method"] in METHODS and "planned_mib" not in r]
    if not missing:
        return False
    with safe_open(str(samples), "pt") as stored:
        tokens = sum(stored.get_slice(k).get_shape()[-1] for k in stored.keys() if k.endswith("/input_ids"))
    baseline = interpreter_baseline_mib()
    for row in missing:
        row["planned_mib"] = round(planned_mib(checkpoint, count, round(tokens / count), row["method"]) + baseline, 1)
        row["interpreter_mib"] = baseline
    return True


def cpu_model() -> str:
    """The processor's name and its matrix extensions (AMX), from /proc/cpuinfo: timings are comparable
    only between runs on the same kind of processor (the sessions' machines have differed)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.partition(":")[2].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{name} ({'AMX' if 'amx_tile' in flags else 'no AMX'})"


def write(args, shape: dict, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_model()
    result = {"shape": args.shape, "model": shape, "samples": args.samples, "repeats": args.repeats,
              "cpus": os.cpu_count(), "cpu": cpu, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    wall = {m: statistics.median(r["wall_seconds"] for r in rows if r["method"] == m) for m in methods}
    repeats = {m: sum(r["method"] == m for r in rows) for m in methods}
    rss = {m: max(r["peak_rss_mib"] for r in rows if r["method"] == m) for m in methods}
    plans = {m: max(r["planned_mib"] for r in rows if r["method"] == m) for m in methods
             if all("planned_mib" in r for r in rows if r["method"] == m)}
    calib = {m: statistics.median(r["calibration_seconds"] for r in rows if r["method"] == m)
             for m in methods if all(r.get("calibration_seconds") for r in rows if r["method"] == m)}
    # each tlq method's peer in llm-compressor (TLQ's is its nearest: AWQ + GPTQ)
    peers = {"gptq": "llmc:gptq", "tlq": "llmc:awq_gptq", "awq": "llmc:awq", "awq_gptq": "llmc:awq_gptq"}
    lines = [f"Qwen2-VL {args.shape} text widths (hidden {shape['hidden']}, MLP {shape['intermediate']}, "
             f"{shape['layers']} layers), {args.samples} samples of ~280 tokens, W4A16, median of the repeats run; "
             f"{os.cpu_count()} CPUs, {cpu}.", "",
             "| method | repeats | wall s | calibration s | peak RSS MiB | wall vs llm-compressor | "
             "calibration vs llm-compressor | RSS vs llm-compressor | tlq plan MiB (+ interpreter) | "
             "plan / peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        peer = peers.get(m)
        ratio = f"{wall[m] / wall[peer]:.2f}x {peer}" if peer in wall else ""
        rss_ratio = f"{rss[m] / rss[peer]:.2f}x" if peer in rss else ""
        calib_ratio = f"{calib[m] / calib[peer]:.2f}x" if m in calib and peer in calib else ""
        calib_cell = f"{calib[m]:.1f}" if m in calib else "n/a"
        plan_cells = f"{plans[m]:.0f} | {plans[m] / rss[m]:.2f}" if m in plans else " | "
        lines.append(f"| {m} | {repeats[m]} | {wall[m]:.1f} | {calib_cell} | {rss[m]:.0f} | {ratio} | {calib_ratio} | "
                     f"{rss_ratio} | {plan_cells} |")
    phases = ["load", "samples", "capture", "importance", "reference", "rescale", "observe", "solve", "propagate",
              "save", "export"]
    lines += ["", "Where tlq's time goes (seconds, median over repeats; tlq_recipe.json phase_seconds):", "",
              "| method | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    for m in methods:
        timed = [r["phase_seconds"] for r in rows if r["method"] == m and r.get("phase_seconds")]
        if timed:
            cells = [f"{statistics.median(t.get(p, 0.0) for t in timed):.1f}" for p in phases]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += _memory_lines(rows, methods)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _memory_lines(rows: list[dict], methods: list[str]) -> list[str]:
    """The phases that raised each tlq run's peak RSS, in order, with the peak each left (tlq.phases)."""
    marked = [(m, r["phase_peak_rss_mib"]) for m in methods for r in rows
              if r["method"] == m and r.get("phase_peak_rss_mib")]
    if not marked:
        return []
    lines = ["", "Where tlq's memory peak is reached (tlq_recipe.json phase_peak_rss_mib: each phase that raised "
             "the process's peak RSS, with the peak it left, MiB; the last is the run's peak):", ""]
    return lines + [f"- {m}: " + ", ".join(f"{p} {v:.0f}" for p, v in peaks.items()) for m, peaks in marked]


if __name__ == "__main__":
    raise SystemExit(main())
