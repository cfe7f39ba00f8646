"""Is a cost change the code or the machine? Two commits' `benchmarks/cost.py` runs, alternated A B A B.

    .venv/bin/python benchmarks/cost_ab.py --commits 8598e3e,4cae5b3 [--rounds 2] [--layers 1] \
        [--samples 32] [--method tlq] --out benchmarks/results/cost/ab-...

Each commit is checked out once as a detached `git worktree` under --work (its code imported through
PYTHONPATH, so editing this tree cannot change a running job), and the runs alternate between the two, so
a machine that drifts slower or faster over the hour shows up in both columns instead of in one. Each run
is one `cost.py --repeats 1` child (its own random-weight checkpoint built the same way from the same seed)
writing its own folder under --out/runs; this script then collects them into results.json and table.md
(`--collect` only collects folders an earlier, interrupted run left). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("importance", "reference", "rescale", "observe", "solve", "propagate")


def worktree(work: Path, commit: str) -> Path:
    folder = work / commit
    if not (folder / "src").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit], check=True)
        (folder / ".venv").symlink_to(ROOT / ".venv")
    return folder


def run_one(folder: Path, args, label: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(folder / "src")}
    command = [sys.executable, str(folder / "benchmarks" / "cost.py"), "--shape", args.shape, "--layers",
               str(args.layers), "--samples", str(args.samples), "--repeats", "1", "--methods", args.method,
               "--out", str(args.out / "runs" / label)]
    subprocess.run(command, cwd=folder, env=env, check=True)


def collect(out: Path, commits: list[str]) -> dict:
    rows = []
    for folder in sorted((out / "runs").iterdir()):
        commit, _, round_ = folder.name.rpartition("-r")
        for row in json.loads((folder / "results.json").read_text())["rows"]:
            rows.append({"commit": commit, "round": int(round_), **row})
    rows.sort(key=lambda r: (r["round"], commits.index(r["commit"])))
    return {"commits": commits, "rows": rows}


def table(result: dict) -> str:
    lines = ["| commit | round | calibration s | peak RSS MiB | load | " + " | ".join(PHASES) + " |",
             "|---|---|---|---|---|" + "---|" * len(PHASES)]
    for r in result["rows"]:
        phases = " | ".join(f"{r['phase_seconds'].get(p, 0.0):.1f}" for p in PHASES)
        lines.append(f"| {r['commit']} | {r['round']} | {r['calibration_seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['load_average']:.2f} | {phases} |")
    a, b = result["commits"]
    median = {c: statistics.median(r["calibration_seconds"] for r in result["rows"] if r["commit"] == c)
              for c in (a, b)}
    lines += ["", f"Median calibration seconds: {a} {median[a]:.1f}, {b} {median[b]:.1f} "
                  f"({b} / {a} = {median[b] / median[a]:.3f})."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", required=True, help="A,B")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", default="2b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--method", default="tlq")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "cost-ab")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--collect", action="store_true", help="only collect the run folders under --out/runs")
    args = parser.parse_args()
    args.out = args.out.resolve()  # the runs work in their worktrees: a relative --out would land there
    commits = args.commits.split(",")
    if len(commits) != 2:
        raise SystemExit("--commits takes two commits, A,B")
    if not args.collect:
        folders = {c: worktree(args.work, c) for c in commits}
        for round_ in range(1, args.rounds + 1):
            for commit in commits:
                run_one(folders[commit], args, f"{commit}-r{round_}")
    result = {"shape": args.shape, "layers": args.layers, "samples": args.samples, "method": args.method,
              **collect(args.out, commits)}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "table.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
