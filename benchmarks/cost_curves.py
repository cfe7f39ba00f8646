"""Cost curves: tlq's calibration time and peak memory against samples, tokens per sample, hidden size and
layers, the fitted growth of each, and `tlq plan`'s estimate against the measured peak.

    .venv/bin/python benchmarks/cost_curves.py [--methods gptq,tlq] [--sweeps samples,tokens,hidden,layers] \
        [--values samples=64,128,256] [--base hidden=512] [--out benchmarks/results/cost/curves]

Every point is a random-weight Qwen2VLForConditionalGeneration (benchmarks/cost.py builds it) quantized to
W4A16 by one `tlq quantize` child process at a time (tlq.measure: wall, own peak RSS; tlq_recipe.json:
calibration seconds and the phase breakdown). The base point is hidden 1024 (MLP 5888, the 2B model's
ratio), 2 decoder layers, 64 samples of ~280 tokens (a 256-token image); each sweep moves one of them:

    samples   64, 128, 256, 512
    tokens    images of ~64, ~144, 256 tokens (the processor's image side: 128, 192, 256 px; the synthetic
              images are 256 px, so a larger side adds no tokens)
    hidden    512, 1024, 1536, 2048 (MLP 5.75x, 128-dim heads, 2 KV heads)
    layers    1, 2, 4

Growth is the least-squares slope of log(calibration seconds) and log(peak RSS above the interpreter's
own) against log(x). `tlq plan` is asked for the same run (one rank, float32) and its host + device
peaks (one CPU process holds both) plus the interpreter's measured baseline are compared with the peak.
Writes results.json, table.md and chart.png under --out after every point, so an interrupted run keeps
what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"samples": 64, "image": 256, "hidden": 1024, "layers": 2}
SWEEPS = {"samples": [64, 128, 256, 512], "tokens": [128, 192, 256], "hidden": [512, 1024, 1536, 2048],
          "layers": [1, 2, 4]}
SWEEP_KEY = {"samples": "samples", "tokens": "image", "hidden": "hidden", "layers": "layers"}


def mlp_width(hidden: int) -> int:
    return int(round(hidden * 5.75 / 128)) * 128


def checkpoint(work: Path, hidden: int, layers: int, image: int) -> Path:
    """A random-weight Qwen2-VL of these widths (built once, kept under --work)."""
    import torch

    from tlq.data.synthetic import vocabulary
    from tlq.reference.checkpoint import ModelSize, build_model_and_processor, save_checkpoint

    folder = work / f"h{hidden}-l{layers}-img{image}"
    if not (folder / "config.json").exists():
        size = ModelSize(hidden=hidden, intermediate=mlp_width(hidden), layers=layers, heads=hidden // 128,
                         kv_heads=2, vision_hidden=64, vision_layers=1, vision_heads=2, patch=8, image_size=image)
        torch.manual_seed(0)
        model, processor = build_model_and_processor("qwen2_vl", vocabulary(), size, seed=0)
        save_checkpoint(model, processor, folder)
    return folder


def interpreter_baseline_mib() -> float:
    """Peak RSS of a process that only imports what `tlq quantize` imports (not counted by `tlq plan`)."""
    from tlq.bench import run_measured

    code = "import torch, transformers, tlq.api, tlq.engine; transformers.AutoModelForImageTextToText"
    return run_measured([sys.executable, "-c", code], "interpreter baseline")["peak_rss_mib"]


def planned_mib(model: Path, samples: int, tokens: int, method: str) -> float:
    from tlq.plan import method_plan_inputs, model_shape, plan_memory

    plan = plan_memory(model_shape(model), 1, 1 << 40, samples, tokens, dtype_bytes=4,
                       **method_plan_inputs(method))
    return plan["one_process_gib"] * 1024  # host and device in one CPU process (tlq.plan._one_process_peak)


def points_to_measure(rows: list[dict], sweeps: list[str], values: dict, methods: list[str]):
    """(sweep, point, method, reused row or None) for every point of the requested sweeps not yet in `rows`.

    Every saved row is kept (a point measured before is not measured again), so a run can add a method, a
    sweep or points to a folder, and an interrupted run resumes. The base point lies on every sweep: one
    run serves them all (its copy names the sweep it was run for). `rows` grows as the caller appends.
    """
    for sweep in sweeps:
        if sweep not in SWEEPS:
            raise SystemExit(f"unknown sweep {sweep!r}: use {', '.join(SWEEPS)}")
        for value in values[sweep]:
            point = {**BASE, SWEEP_KEY[sweep]: value}
            for method in methods:
                same = [r for r in rows if r["method"] == method and all(r[k] == point[k] for k in BASE)]
                if any(r["sweep"] == sweep for r in same):
                    continue
                reused = ({**same[0], "sweep": sweep, "run_for_sweep": same[0].get("run_for_sweep", same[0]["sweep"])}
                          if same else None)
                yield sweep, point, method, reused


def run_point(args, work: Path, data_root: Path, method: str, point: dict) -> dict:
    from tlq.bench import run_measured
    from tlq.data.synthetic import write_split

    model = checkpoint(work, point["hidden"], point["layers"], point["image"])
    data = data_root / "calib"
    if not (data / "calib.json").exists():
        write_split(data, max(SWEEPS["samples"]), seed=1, name="calib", condition="background")
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "tlq", "quantize", str(model), "--out", str(out), "--calib",
               str(data / "calib.json"), "--images", str(data), "--method", method, "--scheme", "W4A16",
               "--num-samples", str(point["samples"]), "--seed", "0", "--device", "cpu", "--quiet", "--no-resume",
               "--overwrite"]
    measured = run_measured(command, f"{method} {point}")
    saved = json.loads((out / "tlq_recipe.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    tokens = saved["calibration"]["num_tokens"]
    per_sample = round(tokens / point["samples"]) if tokens else None
    return {**point, "method": method, **measured, "calibration_seconds": saved.get("calibration_seconds"),
            "phase_seconds": saved.get("phase_seconds"), "phase_peak_rss_mib": saved.get("phase_peak_rss_mib"),
            "tokens_per_sample": per_sample,
            "planned_mib": round(planned_mib(model, point["samples"], per_sample or 280, method), 1),
            "load_average": os.getloadavg()[0]}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    var = sum((p[0] - mx) ** 2 for p in pairs)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pairs) / var, 2) if var else None


def sweep_x(sweep: str, row: dict) -> float:
    return row["tokens_per_sample"] if sweep == "tokens" else row[SWEEP_KEY[sweep]]


def fits(rows: list[dict], baseline: float) -> list[dict]:
    found = []
    for sweep in SWEEPS:
        for method in dict.fromkeys(r["method"] for r in rows):
            chosen = [r for r in rows if r["sweep"] == sweep and r["method"] == method]
            xs = [sweep_x(sweep, r) for r in chosen]
            phases = {}
            for phase in ("importance", "rescale", "observe", "solve", "reference", "propagate"):
                values = [(r.get("phase_seconds") or {}).get(phase, 0.0) for r in chosen]
                if any(values):
                    phases[phase] = slope(xs, values)
            found.append({"sweep": sweep, "method": method, "points": len(chosen),
                          "time_exponent": slope(xs, [r["calibration_seconds"] for r in chosen]),
                          "memory_exponent": slope(xs, [r["peak_rss_mib"] - baseline for r in chosen]),
                          "phase_time_exponents": phases})
    return [f for f in found if f["points"]]


def write(out: Path, rows: list[dict], baseline: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    order = list(SWEEPS)
    rows = sorted(rows, key=lambda r: (order.index(r["sweep"]), r["method"], sweep_x(r["sweep"], r)))
    fitted = fits(rows, baseline)
    (out / "results.json").write_text(json.dumps({"base": BASE, "sweeps": SWEEPS, "cpus": os.cpu_count(),
                                                  "interpreter_baseline_mib": baseline, "rows": rows,
                                                  "fits": fitted}, indent=1) + "\n")
    lines = [f"W4A16, random-weight Qwen2-VL text widths, {os.cpu_count()} CPUs; base point {BASE} "
             f"(image side in px); interpreter baseline {baseline:.0f} MiB.", "",
             "| sweep | method | x | tokens/sample | calibration s | wall s | peak RSS MiB | plan MiB "
             "(+ baseline) | plan / measured | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        planned = r["planned_mib"] + baseline
        lines.append(f"| {r['sweep']} | {r['method']} | {sweep_x(r['sweep'], r)} | {r['tokens_per_sample']} | "
                     f"{r['calibration_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{planned:.0f} | {planned / r['peak_rss_mib']:.2f} | {r['load_average']:.1f} |")
    lines += ["", "Fitted growth (time ~ x^a, memory above the baseline ~ x^b; per phase: time exponents):", "",
              "| sweep | method | points | a (time) | b (memory) | phases |", "|---|---|---|---|---|---|"]
    for f in fitted:
        phases = ", ".join(f"{k} {v}" for k, v in f["phase_time_exponents"].items())
        lines.append(f"| {f['sweep']} | {f['method']} | {f['points']} | {f['time_exponent']} | "
                     f"{f['memory_exponent']} | {phases} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    chart(out, rows, baseline)


def chart(out: Path, rows: list[dict], baseline: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in SWEEPS if any(r["sweep"] == s for r in rows)]
    if not sweeps:
        return
    figure, axes = plt.subplots(2, len(sweeps), figsize=(4 * len(sweeps), 7), squeeze=False)
    for column, sweep in enumerate(sweeps):
        for method in dict.fromkeys(r["method"] for r in rows):
            chosen = sorted((r for r in rows if r["sweep"] == sweep and r["method"] == method),
                            key=lambda r: sweep_x(sweep, r))
            xs = [sweep_x(sweep, r) for r in chosen]
            axes[0][column].plot(xs, [r["calibration_seconds"] for r in chosen], "o-", label=method)
            axes[1][column].plot(xs, [r["peak_rss_mib"] for r in chosen], "o-", label=f"{method} measured")
            # The plan counts what tlq allocates; the interpreter's own baseline is added, as in the table.
            axes[1][column].plot(xs, [r["planned_mib"] + baseline for r in chosen], "x--",
                                 label=f"{method}: tlq plan + interpreter")
        for row, label in ((0, "calibration s"), (1, "peak RSS MiB")):
            axes[row][column].set_xscale("log")
            axes[row][column].set_yscale("log")
            axes[row][column].set_xlabel("tokens per sample" if sweep == "tokens" else sweep)
            axes[row][column].set_ylabel(label)
            axes[row][column].legend(fontsize=7)
    figure.suptitle("tlq calibration cost (W4A16, CPU): one variable moved from the base point at a time")
    figure.tight_layout()
    figure.savefig(out / "chart.png", dpi=90)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="gptq,tlq")
    parser.add_argument("--sweeps", default=",".join(SWEEPS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "cost" / "curves")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cost" / "curves")
    parser.add_argument("--values", action="append", default=[], metavar="SWEEP=X,Y",
                        help="measure only these points of a sweep (e.g. samples=64,128,256), repeatable")
    parser.add_argument("--base", action="append", default=[], metavar="KEY=X",
                        help=f"move the base point (keys {', '.join(BASE)}), e.g. hidden=512 for cheaper sweeps; "
                             "use a new --out, since rows are matched on the point")
    parser.add_argument("--replot", action="store_true", help="only rewrite table.md and chart.png from results.json")
    args = parser.parse_args()
    for item in args.base:
        key, _, value = item.partition("=")
        if key not in BASE or not value.isdigit():
            raise SystemExit(f"--base {item!r}: write KEY=X with KEY one of {', '.join(BASE)}")
        BASE[key] = int(value)
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())
        write(args.out, saved["rows"], saved["interpreter_baseline_mib"])
        return 0
    values = dict(SWEEPS)
    for item in args.values:
        sweep, _, listed = item.partition("=")
        if sweep not in SWEEPS or not listed:
            raise SystemExit(f"--values {item!r}: write SWEEP=X,Y with SWEEP one of {', '.join(SWEEPS)}")
        values[sweep] = [int(x) for x in listed.split(",")]
    baseline = interpreter_baseline_mib()
    previous = json.loads((args.out / "results.json").read_text())["rows"] if (args.out / "results.json").exists() else []
    rows = list(previous)
    for sweep, point, method, reused in points_to_measure(rows, args.sweeps.split(","), values,
                                                          args.methods.split(",")):
        if reused is not None:
            rows.append(reused)
            continue
        row = {"sweep": sweep, **run_point(args, args.work, args.work, method, point)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args.out, rows, baseline)
    write(args.out, rows, baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
