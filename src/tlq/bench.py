"""The method x scheme x seed benchmark: quantize, evaluate, tabulate.

Each cell runs `tlq quantize` in a child process (so its peak memory is its own, read from the OS when
it exits) and evaluates the written checkpoint in-process against the FP model on the held-out split.
Cells are saved to results.json as they finish, and a rerun skips finished cells. The Markdown table
and PNG chart are regenerated from results.json, so they always show exactly what was run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tlq.errors import TlqError
from tlq.evaluate import EvalSet, evaluate
from tlq.recipe import BASELINE_PLANS, METHODS, parse_scheme
from tlq.stats import averaged, versus_best_other


@dataclass
class BenchConfig:
    model_dir: str
    calib: str
    eval_data: str
    out_dir: str
    calib_images: str | None = None
    eval_images: str | None = None
    methods: list[str] = field(default_factory=lambda: ["rtn", "gptq"])
    schemes: list[str] = field(default_factory=lambda: ["W3A16", "W4A8"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_samples: int = 128
    eval_samples: int | None = None
    device: str = "auto"
    keep_checkpoints: bool = False
    quantize_args: list[str] = field(default_factory=list)  # extra `tlq quantize` flags for every cell
    # Weight-only cells with asymmetric grids (the preset until the serving check made symmetric the
    # default; the committed tables under benchmarks/results were measured that way).
    asymmetric_weight_only: bool = False


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_method_spec(spec: str) -> tuple[str, list[str]]:
    """'tlq+keep-ratio=0.25+no-exposure' -> ('tlq', ['--keep-ratio', '0.25', '--no-exposure'])."""
    name, *options = spec.split("+")
    if name not in METHODS:
        raise TlqError(f"unknown method {name!r} in {spec!r}: use {', '.join(METHODS)} (options as +flag=value)")
    flags: list[str] = []
    for option in options:
        key, _, value = option.partition("=")
        flags.append(f"--{key}")
        if value:
            flags.append(value)
    return name, flags


def _cell_key(method: str, scheme: str, seed: int) -> str:
    return f"{method}|{scheme}|{seed}"


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for method in cfg.methods:
        parse_method_spec(method)
    for scheme in cfg.schemes:
        parse_scheme(scheme)
    results_path = out_dir / "results.json"
    results: dict[str, Any] = {"cells": {}}
    if results_path.is_file():
        results = json.loads(results_path.read_text())
    results["config"] = asdict(cfg)
    fp = _FPAnswers(cfg)
    if "fp" not in results:
        results["fp"] = fp.report()
        _atomic_write(results_path, json.dumps(results, indent=1) + "\n")
    for scheme in cfg.schemes:
        for method in cfg.methods:
            for seed in cfg.seeds:
                key = _cell_key(method, scheme, seed)
                if results["cells"].get(key, {}).get("status") == "done":
                    continue
                if not _applies(method, scheme):
                    continue
                checkpoint = out_dir / "checkpoints" / f"{method.replace('=', '')}-{scheme}-s{seed}"
                run = _run_quantize_measured(cfg, method, scheme, seed, checkpoint)
                recipe = json.loads((checkpoint / "tlq_recipe.json").read_text())
                report = fp.evaluate(checkpoint)
                results["cells"][key] = {
                    "status": "done", "method": method, "scheme": scheme, "seed": seed,
                    "accuracy": report["accuracy"], "answer_kl": report["answer_kl"],
                    "answer_nll": report["answer_nll"], "per_type": report["per_type"],
                    "retention": report["accuracy"] / max(results["fp"]["accuracy"], 1e-9),
                    "calibration_seconds": recipe["calibration_seconds"],
                    "quantize_wall_seconds": run["wall_seconds"], "peak_rss_mib": run["peak_rss_mib"],
                    "layer_relative_error": recipe["layer_relative_error"],
                    "per_question": report["per_question"],  # for the paired bootstrap (tlq.stats)
                }
                if progress:
                    cell = results["cells"][key]
                    print(f"{key}: accuracy {cell['accuracy']:.3f}, KL {cell['answer_kl']:.2e}, "
                          f"calibration {cell['calibration_seconds']:.1f} s", flush=True)
                _atomic_write(results_path, json.dumps(results, indent=1) + "\n")
                if not cfg.keep_checkpoints:
                    shutil.rmtree(checkpoint, ignore_errors=True)
    if not cfg.keep_checkpoints and (out_dir / "checkpoints").is_dir() and not any((out_dir / "checkpoints").iterdir()):
        (out_dir / "checkpoints").rmdir()  # each cell removed its own; an empty folder would say otherwise
    table = markdown_table(results)
    _atomic_write(out_dir / "table.md", table)
    chart(results, out_dir / "chart.png")
    return results


class _FPAnswers:
    """The FP model is evaluated once per bench run; its answer log-probabilities serve every cell's KL.

    The quantized checkpoints carry the FP model's processor, so the held-out inputs are built once too.
    When the cached log-probabilities would be large (real vocabularies), the FP model runs again per cell.
    """

    MAX_CACHE_BYTES = 2**30

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.eval_set: EvalSet | None = None
        self.logp: list | None = None
        self._report: dict[str, Any] | None = None

    def report(self) -> dict[str, Any]:
        if self._report is None:
            from tlq.models.processing import load_processor

            cfg = self.cfg
            self.eval_set = EvalSet.load(cfg.eval_data, cfg.eval_images, load_processor(cfg.model_dir),
                                         cfg.eval_samples)
            logp: list = []
            self._report = evaluate(cfg.model_dir, cfg.eval_data, cfg.eval_images, eval_set=self.eval_set,
                                    keep_logp=logp)
            if sum(t.numel() * t.element_size() for t in logp) <= self.MAX_CACHE_BYTES:
                self.logp = logp
        return self._report

    def evaluate(self, checkpoint: Path) -> dict[str, Any]:
        self.report()
        return evaluate(checkpoint, self.cfg.eval_data, self.cfg.eval_images, reference=self.cfg.model_dir,
                        eval_set=self.eval_set, reference_logp=self.logp, per_question=True)


def _run_quantize_measured(cfg: BenchConfig, method: str, scheme: str, seed: int, out: Path) -> dict[str, Any]:
    """Run `tlq quantize` as a child and read its own peak RSS from wait4 (Linux reports KiB)."""
    name, flags = parse_method_spec(method)
    argv = [sys.executable, "-m", "tlq", "quantize", cfg.model_dir, "--out", str(out), "--calib", cfg.calib,
            "--method", name, "--scheme", scheme, "--seed", str(seed), "--num-samples", str(cfg.num_samples),
            "--device", cfg.device, "--overwrite", "--quiet", *flags, *cfg.quantize_args]
    if cfg.asymmetric_weight_only and not parse_scheme(scheme).quantizes_activations:
        argv.append("--no-symmetric")
    if cfg.calib_images:
        argv += ["--images", cfg.calib_images]
    return run_measured(argv, f"quantize {method} {scheme} seed {seed}")


def run_measured(argv: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child process; its wall time and its own peak RSS (through tlq.measure, so that this
    process's memory is not counted; under torchrun, the largest rank's)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "measure.json"
        with open(Path(scratch) / "stderr", "w+") as err:
            code = subprocess.call([sys.executable, "-m", "tlq.measure", str(report), "--", *argv],
                                   stdout=subprocess.DEVNULL, stderr=err, env=env)
            err.seek(0)
            message = err.read().strip().splitlines()
        if code != 0 or not report.exists():
            raise TlqError(f"{what} failed: {message[-1] if message else code}")
        measured = json.loads(report.read_text())
    return {"wall_seconds": measured["wall_seconds"], "peak_rss_mib": round(measured["peak_rss_bytes"] / 2**20, 1)}


def _applies(method: str, scheme: str) -> bool:
    plan = BASELINE_PLANS.get(parse_method_spec(method)[0])
    return not (plan is not None and plan.needs_activation_scheme and not parse_scheme(scheme).quantizes_activations)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (scheme, method): mean and std over seeds, and (where every cell kept its per-question
    results) the paired bootstrap against the best other method of the scheme (tlq.stats)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in results["cells"].values():
        if cell.get("status") == "done":
            groups.setdefault((cell["scheme"], cell["method"]), []).append(cell)
    order = {m: i for i, m in enumerate(results.get("config", {}).get("methods", []))}
    rows = []
    for (scheme, method), cells in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        row = {"scheme": scheme, "method": method, "seeds": len(cells)}
        for metric in ("accuracy", "retention", "answer_kl", "calibration_seconds", "peak_rss_mib"):
            row[metric] = _mean_std([c[metric] for c in cells])
        if all("per_question" in c for c in cells):
            row["per_question"] = averaged([c["per_question"] for c in cells])
        rows.append(row)
    for scheme in {row["scheme"] for row in rows}:
        same = {row["method"]: row for row in rows if row["scheme"] == scheme and "per_question" in row}
        for method, versus in versus_best_other({m: r["per_question"] for m, r in same.items()}).items():
            same[method]["versus_best_other"] = versus
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    fp = results["fp"]
    lines = [f"FP accuracy {fp['accuracy']:.3f} on {fp['num_questions']} held-out questions "
             f"(model {results.get('config', {}).get('model_dir', '?')}).", "",
             "| scheme | method | seeds | accuracy | retention | answer KL | vs best other: accuracy diff; KL ratio "
             "(95% CI, paired bootstrap) | verdict | calib s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summarize(results):
        acc, ret, kl, sec, rss = (row[m] for m in ("accuracy", "retention", "answer_kl", "calibration_seconds",
                                                     "peak_rss_mib"))
        versus = row.get("versus_best_other")
        vs = (f"{versus['method']}: [{versus['accuracy_diff'][0]:+.3f}, {versus['accuracy_diff'][1]:+.3f}]; "
              f"[{versus['kl_ratio'][0]:.2f}, {versus['kl_ratio'][1]:.2f}]x") if versus else ""
        lines.append(f"| {row['scheme']} | {row['method']} | {row['seeds']} | {acc[0]:.3f} ± {acc[1]:.3f} | "
                     f"{ret[0]:.3f} ± {ret[1]:.3f} | {kl[0]:.2e} ± {kl[1]:.1e} | {vs} | "
                     f"{versus['verdict'] if versus else ''} | {sec[0]:.1f} | {rss[0]:.0f} |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars of retention (mean, std over seeds) per scheme and method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install 'tlq[bench]')", file=sys.stderr)
        return None
    rows = summarize(results)
    schemes = sorted({r["scheme"] for r in rows})
    methods = [m for m in results.get("config", {}).get("methods", []) if any(r["method"] == m for r in rows)]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(schemes) * max(len(methods), 1) * 0.5, 3.6))
    for i, method in enumerate(methods):
        xs, ys, es = [], [], []
        for j, scheme in enumerate(schemes):
            row = next((r for r in rows if r["scheme"] == scheme and r["method"] == method), None)
            if row:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(row["retention"][0])
                es.append(row["retention"][1])
        ax.bar(xs, ys, width, yerr=es, label=method, capsize=2)
    ax.set_xticks(range(len(schemes)), schemes)
    ax.set_ylabel("retention (quantized / FP accuracy)")
    ax.set_ylim(0, 1.05)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend(fontsize=8, ncol=min(len(methods), 3))
    ax.set_title(Path(results.get("config", {}).get("model_dir", "")).name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
