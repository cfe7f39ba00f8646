"""tlq's methods and the external peers, side by side on the same cells, scored by one evaluator.

    .venv/bin/python benchmarks/peers/run.py --model runs/variants/qwen2_vl-large-weight-s32 \
        --schemes W3A16 --seeds 0,1,2 --out benchmarks/results/qwen2_vl-large/peers/weight_outliers

For every (scheme, seed): tlq's calibration records for that seed are rendered once
(benchmarks/peers/samples.py) and every method quantizes from them: tlq's methods through `tlq quantize`,
llm-compressor's recipes through benchmarks/peers/llmc_quantize.py in .venv-llmc and AutoRound through
benchmarks/peers/autoround_quantize.py in .venv-autoround (build both with benchmarks/peers/build_venvs.sh). Each quantization is a subprocess, run one at a time; its wall time and
peak RSS (through tlq.measure, as `tlq bench` measures) are recorded the same way for tlq and for the peers. Every checkpoint is
then scored with tlq.evaluate on the same held-out questions against the FP model's answers (exact match
and answer KL per question), and each method is compared with every other by a paired bootstrap over
questions (per-question values averaged over the seeds). Results: results.json (per-question values
included) and table.md. Finished checkpoints are reused on a rerun; --fresh requantizes.

Weight-only cells use symmetric grids for every method (tlq's preset and llm-compressor's W4A16 preset).
A peer's `ignore` list names modules as transformers 5.17 saves them (`visual.*`); transformers 5.24 loads
them as `model.visual.*`, so the driver adds those names before scoring (a user reloading the peer's
output in a newer transformers has to do the same; without it the vision tower would be "quantized" on
load and the checkpoint refused).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tlq.stats import averaged, paired_bootstrap, verdict

ROOT = Path(__file__).resolve().parents[2]
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
AUTOROUND_PYTHON = ROOT / ".venv-autoround" / "bin" / "python"
TLQ_BIN = ROOT / ".venv" / "bin" / "tlq"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
# Where each llm-compressor recipe applies (its documented use) and why not elsewhere.
LLMC_RECIPES = {"gptq": None, "awq": "weight-only", "awq_gptq": "weight-only", "smoothquant_gptq": "activations"}
# The non-decoder subtrees per family, as llm-compressor's own VLM examples write them.
LLMC_IGNORE = {"qwen2_vl": ["lm_head", "re:visual.*", "re:model.visual.*"],
               "qwen2_5_vl": ["lm_head", "re:visual.*", "re:model.visual.*"],
               "llava_onevision": ["lm_head", "re:vision_tower.*", "re:model.vision_tower.*",
                                   "re:multi_modal_projector.*", "re:model.multi_modal_projector.*"],
               # Qwen3-VL: the tower and its DeepStack mergers live under model.visual; the tower's norms and
               # Linears (norm1/2, linear_fc1/2) match none of llm-compressor's AWQ / SmoothQuant mappings.
               "qwen3_vl": ["lm_head", "re:visual.*", "re:model.visual.*"]}
# Families whose vision tower reuses the decoder's module names: llm-compressor's AWQ / SmoothQuant
# mappings must be limited to the language model (benchmarks/peers/llmc_quantize.py --scope).
LLMC_SCOPE = {"llava_onevision": r".*language_model\."}
# tlq's implementation of each algorithm a peer also implements (the "same algorithm" column).
SAME_ALGORITHM = {"gptq+act-order": "llmc:gptq", "awq": "llmc:awq", "awq_gptq": "llmc:awq_gptq",
                  "smoothquant_gptq": "llmc:smoothquant_gptq"}


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run one quantization as a child process; wall seconds and its own peak RSS (MiB).

    Through tlq.measure, a small launcher: a child forked straight from this process would report this
    process's resident memory at the fork (Linux keeps the high-water mark across exec) as its own peak.
    """
    report = log.with_suffix(".measure.json")
    report.unlink(missing_ok=True)
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "-m", "tlq.measure", str(report), "--", *cmd],
                               stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if not report.exists():
        return {"exit": code, "wall_seconds": None, "peak_rss_mib": None}
    measured = json.loads(report.read_text())
    return {"exit": measured["returncode"], "wall_seconds": measured["wall_seconds"],
            "peak_rss_mib": round(measured["peak_rss_bytes"] / 2**20, 1)}


def is_peer(method: str) -> bool:
    return method.startswith("llmc:") or method == "autoround"


def applies(method: str, scheme) -> str | None:
    """None when the method can run this scheme, else the reason it cannot."""
    if method == "autoround" and scheme.quantizes_activations:
        return "AutoRound's W*A8 export needs an accelerator; weight-only here"
    if method.startswith("llmc:"):
        need = LLMC_RECIPES[method.split(":", 1)[1]]
        if need == "weight-only" and scheme.quantizes_activations:
            return "AWQ recipes are weight-only in llm-compressor's documentation"
        if need == "activations" and not scheme.quantizes_activations:
            return "SmoothQuant migrates activation outliers: W*A8 only"
        return None
    from tlq.recipe import BASELINE_PLANS  # tlq's own rule, decided by the method's plan

    plan = BASELINE_PLANS.get(method.split("+", 1)[0])
    if plan is not None and plan.needs_activation_scheme and not scheme.quantizes_activations:
        return "SmoothQuant migrates activation outliers: W*A8 only"
    return None


def llmc_command(method: str, model: str, samples: Path, scheme, family: str, layer_class: str, out: Path) -> list[str]:
    """The llm-compressor run of `method` ("llmc:<recipe>") in its venv, on tlq's samples."""
    return [str(LLMC_PYTHON), str(ROOT / "benchmarks/peers/llmc_quantize.py"), "--model", str(model),
            "--samples", str(samples), "--recipe", method.split(":", 1)[1], "--scheme", json.dumps(scheme.to_dict()),
            "--ignore", json.dumps(LLMC_IGNORE[family]), "--layer-class", layer_class, "--out", str(out)] + (
                ["--scope", LLMC_SCOPE[family]] if family in LLMC_SCOPE else [])


def quantize_command(method: str, args, scheme, seed: int, samples: Path, family: str, layer_class: str,
                     out: Path, label: str) -> list[str]:
    """The child process that quantizes one cell; `label`: the scheme as it was asked for (tlq's spelling)."""
    if method == "autoround":
        return [str(AUTOROUND_PYTHON), "benchmarks/peers/autoround_quantize.py", "--model", args.model,
                "--samples", str(samples), "--scheme", json.dumps(scheme.to_dict()), "--out", str(out)]
    if method.startswith("llmc:"):
        return llmc_command(method, args.model, samples, scheme, family, layer_class, out)
    name, *options = method.split("+")
    cmd = [str(TLQ_BIN), "quantize", args.model, "--calib", args.calib, "--images", args.images,
           "--method", name, "--scheme", label, "--num-samples", str(args.num_samples),
           "--seed", str(seed), "--out", str(out), "--quiet", "--no-resume", "--overwrite"]
    for option in options:
        flag, _, value = option.partition("=")
        cmd += [f"--{flag}"] + ([value] if value else [])
    return cmd


def finish_peer_output(out: Path, model: str) -> None:
    """The processor files a peer does not write, and the transformers-5 module names in `ignore`."""
    for name in PROCESSOR_FILES:
        if (Path(model) / name).is_file() and not (out / name).exists():
            shutil.copy2(Path(model) / name, out / name)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    ignore = config["quantization_config"].get("ignore", [])
    extra = [f"model.{e}" for e in ignore if not e.startswith(("re:", "model.", "lm_head")) and f"model.{e}" not in ignore]
    # LLaVA-OneVision's tower is stored as vision_tower.vision_model.* but loaded as model.vision_tower.*:
    # no prefix maps one onto the other, so each ignored subtree also gets a pattern (as tlq writes).
    heads = [e for e in ignore if e.split(".")[-1] == "lm_head"]  # stored as language_model.lm_head in LLaVA
    extra += ["lm_head"] if heads and "lm_head" not in ignore else []
    roots = sorted({e.split(".")[0] for e in ignore if not e.startswith(("re:", "model.")) and e not in heads})
    extra += [f"re:(.*\\.)?{root}\\..*" for root in roots if f"re:(.*\\.)?{root}\\..*" not in ignore]
    config["quantization_config"]["ignore"] = ignore + extra
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def score(checkpoint: Path, eval_set, reference_logp, pad_id: int) -> dict:
    from tlq.evaluate import _load_checked, score_samples

    model = _load_checked(checkpoint).eval()
    with torch.no_grad():
        answers = score_samples(model, eval_set.samples, pad_id, reference_logp=reference_logp)
    return {"exact": [a["exact"] for a in answers], "kl": [a["kl"] for a in answers],
            "tokens": [a["tokens"] for a in answers]}


def score_once(checkpoint: Path, eval_set, reference_logp, pad_id: int, args) -> dict:
    """score(), kept beside the checkpoint for the same evaluation questions (reruns add methods cheaply)."""
    cache = checkpoint.with_name(checkpoint.name + ".scores.json")
    key = {"eval": args.eval, "questions": len(eval_set.samples)}
    if cache.exists() and not args.fresh:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key and cache.stat().st_mtime >= (checkpoint / "config.json").stat().st_mtime:
            return saved["scores"]
    scores = score(checkpoint, eval_set, reference_logp, pad_id)
    cache.write_text(json.dumps({"key": key, "scores": scores}) + "\n")
    return scores


def summary(per_question: dict) -> dict:
    tokens = sum(per_question["tokens"])
    return {"accuracy": sum(per_question["exact"]) / len(per_question["exact"]),
            "answer_kl": sum(per_question["kl"]) / tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", default="runs/data/vqa/calib.json")
    parser.add_argument("--images", default="runs/data/vqa")
    parser.add_argument("--eval", default="runs/data/vqa/test.json")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--schemes", default="W3A16")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--methods", default="rtn,gptq,gptq+act-order,awq,smoothquant,tlq,"
                                              "llmc:gptq,llmc:awq,llmc:awq_gptq,llmc:smoothquant_gptq,autoround")
    parser.add_argument("--work", default="runs/peers")
    parser.add_argument("--fresh", action="store_true", help="requantize even where a checkpoint exists")
    parser.add_argument("--retable", action="store_true",
                        help="recompute the verdicts and table.md from OUT/results.json (no quantization)")
    parser.add_argument("--add", action="store_true",
                        help="keep the cells of methods not run now from OUT/results.json (same model, questions, "
                             "seeds and samples), so methods join a table without rerunning the others")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.retable:
        results = json.loads((Path(args.out) / "results.json").read_text())
        for cells in results["cells"].values():
            add_verdicts(cells)
        write(results, Path(args.out))
        return 0
    from tlq.evaluate import EvalSet, _load_checked, score_samples
    from tlq.models import adapter_for, read_model_type
    from tlq.models.processing import load_processor
    from tlq.recipe import parse_scheme
    sys.path.insert(0, str(Path(__file__).parent))
    from samples import write_samples

    family = adapter_for(read_model_type(args.model)).family
    labels = args.schemes.split(",")
    schemes = [parse_scheme(label) for label in labels]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if any(m.startswith("llmc:") for m in methods) and not LLMC_PYTHON.exists():
        raise SystemExit(f"{LLMC_PYTHON} missing: run benchmarks/peers/build_venvs.sh llmc")
    if "autoround" in methods and not AUTOROUND_PYTHON.exists():
        raise SystemExit(f"{AUTOROUND_PYTHON} missing: run benchmarks/peers/build_venvs.sh autoround")
    if any(not is_peer(m) for m in methods) and not TLQ_BIN.exists():
        # otherwise every tlq cell would fail to start and, with --add, replace its saved result
        raise SystemExit(f"{TLQ_BIN} missing: run `make venv` in {ROOT} (or link its .venv there)")
    fp_model = _load_checked(args.model).eval()
    layer_class = type(adapter_for(read_model_type(args.model)).layers(fp_model)[0]).__name__
    processor = load_processor(args.model)
    eval_set = EvalSet.load(args.eval, args.images, processor, args.eval_samples)
    pad_id = processor.tokenizer.pad_token_id
    reference_logp: list[torch.Tensor] = []
    with torch.no_grad():
        fp = score_samples(fp_model, eval_set.samples, pad_id, keep_logp=reference_logp)
    del fp_model
    work = Path(args.work) / Path(args.model).name
    results = {"model": args.model, "family": family, "eval": args.eval, "questions": len(fp),
               "fp_accuracy": sum(a["exact"] for a in fp) / len(fp), "num_samples": args.num_samples,
               "seeds": seeds, "machine": machine(), "cells": {}}
    kept = kept_cells(results, methods, Path(args.out)) if args.add else {}
    # Cells and checkpoints are named as the scheme was asked for (W2A16-g64, not the preset's W2A16), so that
    # two group sizes of one preset never share a cell or a cached checkpoint.
    for label, scheme in zip(labels, schemes):
        runs: dict[str, list[dict]] = {}
        for seed in seeds:
            samples = work / "samples" / f"seed{seed}-n{args.num_samples}.safetensors"
            if not samples.exists():
                write_samples(args.model, args.calib, args.images, args.num_samples, seed, samples)
            for method in methods:
                reason = applies(method, scheme)
                if reason is not None:
                    results["cells"].setdefault(label, {}).setdefault(method, {"skipped": reason})
                    continue
                out = work / label / f"seed{seed}" / method.replace(":", "-")
                record = quantize_once(method, args, scheme, seed, samples, family, layer_class, out, label)
                if record["exit"] != 0:
                    results["cells"].setdefault(label, {})[method] = {"failed": record}
                    print(f"{label} seed {seed} {method}: FAILED (exit {record['exit']}, log {out}.log)", flush=True)
                    continue
                record.update(score_once(out, eval_set, reference_logp, pad_id, args))
                runs.setdefault(method, []).append(record)
                print(f"{label} seed {seed} {method}: {summary(record)} {record['wall_seconds']} s "
                      f"{record['peak_rss_mib']} MiB", flush=True)
        cells = results["cells"].setdefault(label, {})
        cells.update({**kept.get(label, {}), **cells, **compare(runs)})
        add_verdicts(cells)  # against every method of the cell, the kept ones included
    write(results, Path(args.out))
    return 0


def kept_cells(results: dict, methods: list[str], out: Path) -> dict:
    """The saved table's cells of the methods not in `methods`, if it measured the same thing."""
    saved_path = out / "results.json"
    if not saved_path.exists():
        return {}
    saved = json.loads(saved_path.read_text())
    same = ("model", "eval", "questions", "num_samples", "seeds")
    differs = [key for key in same if saved.get(key) != results.get(key)]
    if differs:
        raise SystemExit(f"--add: {saved_path} measured a different {', '.join(differs)}; rerun without --add")
    return {scheme: {m: c for m, c in cells.items() if m not in methods} for scheme, cells in saved["cells"].items()}


def quantize_once(method, args, scheme, seed, samples, family, layer_class, out: Path, label: str) -> dict:
    done = out.with_name(out.name + ".measured.json")
    if done.exists() and (out / "config.json").exists() and not args.fresh:
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = run_measured(quantize_command(method, args, scheme, seed, samples, family, layer_class, out, label),
                          out.with_name(out.name + ".log"))
    if record["exit"] == 0:
        if is_peer(method):
            finish_peer_output(out, args.model)
        done.write_text(json.dumps(record) + "\n")
    return record


def compare(runs: dict[str, list[dict]]) -> dict:
    """Per method: mean/std over seeds and the pooled per-question values; then the verdicts."""
    cells = {}
    for method, method_runs in runs.items():
        pooled = averaged(method_runs)
        scores = [summary(r) for r in method_runs]
        cells[method] = {
            "seeds": len(method_runs),
            "accuracy": [s["accuracy"] for s in scores], "answer_kl": [s["answer_kl"] for s in scores],
            "wall_seconds": [r["wall_seconds"] for r in method_runs],
            "peak_rss_mib": [r["peak_rss_mib"] for r in method_runs],
            "pooled": summary(pooled),
            "per_question": pooled,
        }
    return add_verdicts(cells)


def add_verdicts(cells: dict) -> dict:
    """Each method against the best other method of the cell: the one with the lowest answer KL (accuracy
    cannot rank methods that all sit within noise of FP; KL can), by a paired bootstrap."""
    scored = {m: c for m, c in cells.items() if "per_question" in c}
    for method, cell in scored.items():
        others = [m for m in scored if m != method]
        if not others:
            continue
        best = min(others, key=lambda m: scored[m]["pooled"]["answer_kl"])
        interval = paired_bootstrap(cell["per_question"], scored[best]["per_question"])
        cell["versus_best_other"] = {"method": best, **interval, "verdict": verdict(interval)}
        peer = SAME_ALGORITHM.get(method)
        if peer in scored:
            interval = paired_bootstrap(cell["per_question"], scored[peer]["per_question"])
            cell["versus_peer_same_algorithm"] = {"method": peer, **interval, "verdict": verdict(interval)}
    return cells


def machine() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load], "torch": torch.__version__}


def _mean_std(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.3f} ± {t.std(unbiased=False):.3f}"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"{results['model']}: FP accuracy {results['fp_accuracy']:.3f} on {results['questions']} held-out questions; "
             f"{results['num_samples']} calibration samples, seeds {results['seeds']}; symmetric weight grids.", "",
             "| scheme | method | accuracy | answer KL | vs best other (acc. diff 95% CI; KL ratio 95% CI) | verdict | "
             "vs the peer's same algorithm | quantize wall s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for scheme, cells in results["cells"].items():
        for method, cell in cells.items():
            if "skipped" in cell or "failed" in cell:
                why = cell.get("skipped") or f"failed (exit {cell['failed']['exit']})"
                lines.append(f"| {scheme} | {method} | n/a | n/a | {why} | | | | |")
                continue
            versus = cell.get("versus_best_other")
            vs = (f"{versus['method']}: [{versus['accuracy_diff'][0]:+.3f}, {versus['accuracy_diff'][1]:+.3f}]; "
                  f"[{versus['kl_ratio'][0]:.2f}, {versus['kl_ratio'][1]:.2f}]x") if versus else ""
            same = cell.get("versus_peer_same_algorithm")
            same_text = (f"{same['method']}: KL [{same['kl_ratio'][0]:.2f}, {same['kl_ratio'][1]:.2f}]x, {same['verdict']}"
                         if same else "")
            kl = torch.tensor(cell["answer_kl"], dtype=torch.float64)
            lines.append(f"| {scheme} | {method} | {_mean_std(cell['accuracy'])} | {kl.mean():.2e} ± {kl.std(unbiased=False):.1e} "
                         f"| {vs} | {versus['verdict'] if versus else ''} | {same_text} | {sum(cell['wall_seconds']) / len(cell['wall_seconds']):.1f} | "
                         f"{max(cell['peak_rss_mib']):.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    chart(results, out / "chart.png")
    print("\n".join(lines))


def chart(results: dict, path: Path) -> None:
    """Accuracy and answer KL (log scale) of every method per scheme, coloured by tool; whiskers: min-max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"tlq": "#1f77b4", "llmc": "#ff7f0e", "autoround": "#2ca02c"}
    schemes = list(results["cells"])
    fig, axes = plt.subplots(len(schemes), 2, figsize=(11, 0.45 * max(len(c) for c in results["cells"].values()) * len(schemes) + 1.5),
                             squeeze=False)
    for row, scheme in enumerate(schemes):
        cells = {m: c for m, c in results["cells"][scheme].items() if "accuracy" in c}
        names = list(cells)
        tool = ["autoround" if m == "autoround" else "llmc" if m.startswith("llmc:") else "tlq" for m in names]
        for column, metric in enumerate(("accuracy", "answer_kl")):
            ax = axes[row, column]
            values = [cells[m][metric] for m in names]
            means = [sum(v) / len(v) for v in values]
            low = [max(0.0, m - min(v)) for m, v in zip(means, values)]
            high = [max(0.0, max(v) - m) for m, v in zip(means, values)]
            ax.barh(range(len(names)), means, xerr=[low, high], color=[colors[t] for t in tool])
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.invert_yaxis()
            if metric == "answer_kl":
                ax.set_xscale("log")
                ax.set_xlabel("answer KL to FP (lower is better)")
            else:
                ax.axvline(results["fp_accuracy"], color="gray", linestyle="--", linewidth=1)
                ax.set_xlabel("exact-match accuracy (dashed: FP)")
            ax.set_title(f"{scheme}", fontsize=9)
    fig.suptitle(f"{Path(results['model']).name}: tlq (blue), llm-compressor (orange), AutoRound (green); "
                 f"{len(results['seeds'])} seeds, {results['questions']} questions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
