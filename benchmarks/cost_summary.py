"""The cost benchmark's headline: every saved run that put a tlq method beside its llm-compressor peer, in one table.

    .venv/bin/python benchmarks/cost_summary.py

Reads the `results.json` that `benchmarks/cost.py` saved under benchmarks/results/cost/<run>/ for the runs named
in RUNS below (which runs count, and the tlq commit each measured, are facts from the results README, kept here
as data) and writes benchmarks/results/cost/results.json and table.md: per run and method pair the median
calibration seconds, their ratio, the range of the per-repeat ratios (repeat i of tlq against repeat i of the
peer: the jobs of one repeat ran back to back), the largest peak RSS of each and their ratio, and `tlq plan`
against tlq's largest peak. POOLS below add, per shape and method, the runs of one tlq code made in separate
invocations (the 28-layer runs take 40-60 minutes a job: three interleaved repeats in one invocation would take
4.5 hours), each against every run of its peer (llm-compressor's code is pinned, so all its runs are of one
code): the medians, their ratio, and the extremes of the ratio (tlq's slowest against the peer's fastest and
the reverse). The goals are the issue's: tlq GPTQ <= 1.0x llm-compressor GPTQ's calibration
time, TLQ <= 2x its AWQ + GPTQ, each at equal or lower peak memory; `tlq plan` within 15% of the peak. AWQ
has no goal ratio; its row is there to be read.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import NamedTuple

RESULTS = Path(__file__).resolve().parent / "results" / "cost"
PEERS = {"gptq": "llmc:gptq", "tlq": "llmc:awq_gptq", "awq": "llmc:awq", "awq_gptq": "llmc:awq_gptq"}
GOALS = {"gptq": 1.0, "tlq": 2.0}  # calibration time against the peer; memory: <= 1.0 for both
PLAN_TOLERANCE = 0.15
# Runs saved before cost.py recorded the processor: every session up to 2026-12-03 ran on one machine kept
# between sessions, an AMD EPYC without AMX (docs/serving.md). Timings compare only on one processor.
UNRECORDED_CPU = "AMD EPYC (no AMX; not recorded by the run)"


class Run(NamedTuple):
    folder: str
    commit: str  # the tlq code it measured (the README's command line)
    order: str  # how the jobs ran: "interleaved" repeats, or which tool went first


RUNS = (
    Run("2b-28l-128-gptq", "4ae77c3", "tlq first"),
    Run("2b-28l-128-gptq-llmc-first", "00d1385", "llm-compressor first"),
    Run("2b-28l-128-gptq-3rd", "7f26f82", "tlq first"),
    Run("2b-28l-128-gptq-5th", "81f4275", "llm-compressor first"),
    Run("2b-4l-128-repeats", "0bdc011", "interleaved"),
    Run("7b-2l-128-gptq", "f61997d", "tlq first"),
    Run("2b-2l-128-scaled", "f61997d", "tlq first"),
    Run("2b-1l-128-tlq-pair", "61d280f", "tlq first"),
    Run("2b-1l-128-tlq-pair-llmc-first", "61d280f", "llm-compressor first"),
    Run("2b-1l-128-tlq-repeats", "a4a7f30", "interleaved"),
    Run("2b-1l-128-tlq-bounded-repeats", "819ce6f", "interleaved"),
    Run("2b-1l-128-tlq-bounded-repeats-3rd", "819ce6f", "tlq first"),
    Run("2b-1l-128-awq-repeats", "b875fee", "interleaved"),
    Run("2b-1l-128-awq-gptq-pair", "3d03287", "tlq first"),
    Run("2b-4l-128-tlq-pair", "422966f", "tlq first"),
    Run("2b-4l-128-tlq-pair-llmc-first", "21f1e95", "llm-compressor first"),
    Run("2b-4l-128-gptq-repeats-xeon", "e6ada75", "interleaved"),
    Run("7b-3l-128-gptq-xeon", "60bbd16", "tlq first"),
    Run("2b-1l-128-tlq-pair-xeon", "d0c850d", "tlq first"),
    Run("2b-1l-128-tlq-repeats-xeon", "6d46497", "interleaved"),
    Run("7b-1l-128-tlq-pair-xeon", "b4358ad", "tlq first"),
    Run("2b-28l-128-gptq-xeon", "d91bad2", "tlq first"),
    Run("2b-1l-128-awq-repeats-xeon", "d91bad2", "interleaved"),
)


class Pool(NamedTuple):
    name: str
    method: str
    runs: tuple[str, ...]  # folders whose `method` rows measured one tlq code
    peer_runs: tuple[str, ...]  # folders whose peer rows count
    code: str  # why those runs are one code


POOLS = (
    Pool("2b-28l-128-gptq-pooled", "gptq",
         ("2b-28l-128-gptq-3rd", "2b-28l-128-gptq-4th", "2b-28l-128-gptq-5th"),
         ("2b-28l-128-gptq", "2b-28l-128-gptq-llmc-first", "2b-28l-128-gptq-3rd", "2b-28l-128-gptq-5th"),
         "7f26f82, 7e1b631, 81f4275: between them only tlq.group_data, tlq.rescale and tlq.plan changed, which a "
         "GPTQ run does not execute"),
    Pool("2b-4l-128-tlq-heap-vs-the-pair's-peer", "tlq", ("2b-4l-128-tlq-heap",), ("2b-4l-128-tlq-pair",),
         "90ec041 (the importance pass's heap fix) alone, against llm-compressor's run in the 4-layer pair "
         "three and a half hours earlier (its code is pinned)"),
    Pool("2b-1l-128-tlq-heap-vs-the-bounded-repeats'-peer", "tlq", ("2b-1l-128-tlq-heap", "2b-1l-128-tlq-heap-2"),
         ("2b-1l-128-tlq-bounded-repeats", "2b-1l-128-tlq-bounded-repeats-3rd"),
         "6188b24 (the tlq code of 90ec041 but for tlq.plan) and fc265eb (+ a trim as each layer is done), each "
         "alone, against "
         "llm-compressor's four 1-layer AWQ + GPTQ runs of 2026-12-03 (its code is pinned)"),
)


def _goal_met(method: str, time_ratio: float, rss_ratio: float) -> bool | None:
    goal = GOALS.get(method)
    return None if goal is None else time_ratio <= goal and rss_ratio <= 1.0


def pooled(pool: Pool, saved: dict[str, dict]) -> dict:
    """The pool's runs of its method and of its peer, each side's median and largest peak, and the ratios."""
    peer = PEERS[pool.method]
    cpus = {_cpu(saved[f]) for f in pool.runs + pool.peer_runs}
    if len(cpus) > 1:
        raise SystemExit(f"error: pool {pool.name!r} mixes processors ({', '.join(sorted(cpus))}): "
                         "pool only runs made on one kind of machine")
    ours = [r for f in pool.runs for r in _timed(saved[f]["rows"], pool.method)]
    theirs = [r for f in pool.peer_runs for r in _timed(saved[f]["rows"], peer)]
    seconds = {"tlq": [r["calibration_seconds"] for r in ours], "peer": [r["calibration_seconds"] for r in theirs]}
    time = {side: statistics.median(values) for side, values in seconds.items()}
    peak = {"tlq": max(r["peak_rss_mib"] for r in ours), "peer": max(r["peak_rss_mib"] for r in theirs)}
    planned = [r["planned_mib"] / r["peak_rss_mib"] for r in ours if "planned_mib" in r]
    entry = {"pool": pool.name, "method": pool.method, "peer": peer, "cpu": cpus.pop(),
             "runs": list(pool.runs),
             "peer_runs": list(pool.peer_runs), "code": pool.code, "layers": saved[pool.runs[0]]["model"]["layers"],
             "shape": saved[pool.runs[0]]["shape"], "calibration_seconds_each": seconds,
             "calibration_seconds": time, "time_ratio": time["tlq"] / time["peer"],
             "time_ratio_range": [min(seconds["tlq"]) / max(seconds["peer"]), max(seconds["tlq"]) / min(seconds["peer"])],
             "peak_rss_mib": peak, "rss_ratio": peak["tlq"] / peak["peer"],
             "plan_over_peak_range": [min(planned), max(planned)] if planned else None}
    entry["goal_met"] = _goal_met(pool.method, entry["time_ratio"], entry["rss_ratio"])
    return entry


def pairs(run: Run, saved: dict) -> list[dict]:
    """One entry per tlq method whose llm-compressor peer ran in the same invocation."""
    rows = saved["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return [_pair(run, saved, method, PEERS[method]) for method in methods
            if PEERS.get(method) in methods and _timed(rows, method) and _timed(rows, PEERS[method])]


def _cpu(saved: dict) -> str:
    return saved.get("cpu", UNRECORDED_CPU)


def _timed(rows: list[dict], method: str) -> list[dict]:
    return [r for r in rows if r["method"] == method and r.get("calibration_seconds")]


def _pair(run: Run, saved: dict, method: str, peer: str) -> dict:
    ours, theirs = _timed(saved["rows"], method), _timed(saved["rows"], peer)
    time = {side: statistics.median(r["calibration_seconds"] for r in rows) for side, rows in
            (("tlq", ours), ("peer", theirs))}
    peak = {side: max(r["peak_rss_mib"] for r in rows) for side, rows in (("tlq", ours), ("peer", theirs))}
    by_repeat = {r["repeat"]: r for r in theirs}
    repeat_ratios = [r["calibration_seconds"] / by_repeat[r["repeat"]]["calibration_seconds"]
                     for r in ours if r["repeat"] in by_repeat]
    planned = [r["planned_mib"] for r in ours if "planned_mib" in r]  # cost.py adds the interpreter's own peak
    entry = {"run": run.folder, "commit": run.commit, "order": run.order, "shape": saved["shape"],
             "layers": saved["model"]["layers"], "samples": saved["samples"], "cpu": _cpu(saved), "method": method,
             "peer": peer,
             "repeats": min(len(ours), len(theirs)), "calibration_seconds": time, "peak_rss_mib": peak,
             "time_ratio": time["tlq"] / time["peer"],
             "repeat_time_ratios": [round(x, 4) for x in repeat_ratios],
             "rss_ratio": peak["tlq"] / peak["peer"],
             "plan_over_peak": max(planned) / peak["tlq"] if planned else None}
    entry["goal_met"] = _goal_met(method, entry["time_ratio"], entry["rss_ratio"])
    return entry


def markdown(entries: list[dict]) -> str:
    lines = ["| run | processor | tlq commit | jobs | layers | method vs llm-compressor 0.14 | repeats | "
             "calibration s, tlq / peer (median) | time ratio | per-repeat ratios | "
             "peak RSS MiB, tlq / peer (largest) | RSS ratio | `tlq plan` / peak | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        goal = GOALS.get(e["method"])
        verdict = "-" if goal is None else f"<= {goal:.1f}x, RSS <= 1: **{'met' if e['goal_met'] else 'not met'}**"
        plan = "-" if e["plan_over_peak"] is None else f"{e['plan_over_peak']:.2f}"
        per_repeat = " / ".join(f"{x:.2f}" for x in e["repeat_time_ratios"]) if e["repeats"] > 1 else "-"
        lines.append(f"| `{e['run']}/` | {e['cpu']} | {e['commit']} | {e['order']} | {e['layers']} ({e['shape']}) | "
                     f"{e['method']} vs {e['peer']} | {e['repeats']} | {e['calibration_seconds']['tlq']:.1f} / "
                     f"{e['calibration_seconds']['peer']:.1f} | **{e['time_ratio']:.2f}x** | {per_repeat} | "
                     f"{e['peak_rss_mib']['tlq']:.0f} / {e['peak_rss_mib']['peer']:.0f} | "
                     f"**{e['rss_ratio']:.2f}x** | {plan} | {verdict} |")
    return "\n".join(lines) + "\n"


def pooled_markdown(entries: list[dict]) -> str:
    lines = ["| pool | processor | layers | method vs llm-compressor 0.14 | runs, tlq / peer | "
             "calibration s each, tlq / peer | median, tlq / peer | time ratio (range) | "
             "peak RSS MiB, tlq / peer (largest) | RSS ratio | `tlq plan` / peak | goal |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        goal = GOALS.get(e["method"])
        verdict = "-" if goal is None else f"<= {goal:.1f}x, RSS <= 1: **{'met' if e['goal_met'] else 'not met'}**"
        each = {side: ", ".join(f"{x:.0f}" for x in values) for side, values in e["calibration_seconds_each"].items()}
        low, high = e["time_ratio_range"]
        plan = "-" if e["plan_over_peak_range"] is None else "-".join(f"{x:.2f}" for x in e["plan_over_peak_range"])
        lines.append(f"| {e['pool']} | {e['cpu']} | {e['layers']} ({e['shape']}) | {e['method']} vs {e['peer']} | "
                     f"{len(e['runs'])} / {len(e['peer_runs'])} | {each['tlq']} / {each['peer']} | "
                     f"{e['calibration_seconds']['tlq']:.1f} / {e['calibration_seconds']['peer']:.1f} | "
                     f"**{e['time_ratio']:.2f}x** ({low:.2f}-{high:.2f}) | {e['peak_rss_mib']['tlq']:.0f} / "
                     f"{e['peak_rss_mib']['peer']:.0f} | **{e['rss_ratio']:.2f}x** | {plan} | {verdict} |")
    notes = [f"- {e['pool']}: tlq's runs {', '.join(e['runs'])} ({e['code']}); the peer's: {', '.join(e['peer_runs'])}."
             for e in entries]
    return "\n".join(lines + [""] + notes) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    saved = {}
    for folder in dict.fromkeys([run.folder for run in RUNS] + [f for p in POOLS for f in p.runs + p.peer_runs]):
        path = args.results / folder / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing; rerun its command from {args.results / 'README.md'} "
                             f"or drop {folder!r} from RUNS and POOLS")
        saved[folder] = json.loads(path.read_text())
    entries = [entry for run in RUNS for entry in pairs(run, saved[run.folder])]
    pools = [pooled(pool, saved) for pool in POOLS]
    (args.results / "results.json").write_text(json.dumps({"runs": entries, "pools": pools}, indent=1) + "\n")
    head = ("Every saved run with a tlq method and its llm-compressor 0.14 peer in one invocation of "
            "`benchmarks/cost.py` (Qwen2-VL text widths, random weights, 128 samples of ~280 tokens, W4A16, "
            "2 CPU cores, each job alone; the processor is in each row: timings compare only within one). "
            "Written by `benchmarks/cost_summary.py`; each run's README section says what changed and why.\n\n")
    pools_head = ("\n## Runs of one tlq code pooled across invocations\n\nEach tlq run against every run of its "
                  "peer (llm-compressor's code is pinned); the ratio is of the medians, the range is tlq's fastest "
                  "over the peer's slowest to tlq's slowest over the peer's fastest.\n\n")
    text = head + markdown(entries) + pools_head + pooled_markdown(pools)
    (args.results / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
