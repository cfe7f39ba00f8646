"""Named pairs of methods from one `tlq bench` results.json, compared head to head on the same questions.

    .venv/bin/python benchmarks/pair_table.py benchmarks/results/qwen2_vl-large/validation/smooth_alpha \
        --pair "smoothquant+smooth-alpha=0.8:smoothquant" --pair "smoothquant_gptq+smooth-alpha=0.8:smoothquant_gptq"

`tlq bench`'s own table compares every method with the best *other* one; a knob's question is narrower (this
value against the default, per scheme). Each pair A:B gives, per scheme where both ran, the paired-bootstrap
95% intervals of accuracy(A) - accuracy(B) and KL(A) / KL(B) with seeds pooled per question (tlq.stats), and
A's verdict against B. Writes pairs.json and pairs.md into the folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tlq.bench import summarize
from tlq.stats import paired_bootstrap, verdict


def compare(rows: list[dict], first: str, second: str) -> list[dict]:
    """One entry per scheme in which both methods kept per-question results."""
    by_key = {(row["scheme"], row["method"]): row for row in rows if "per_question" in row}
    out = []
    for scheme in sorted({scheme for scheme, _ in by_key}):
        a, b = by_key.get((scheme, first)), by_key.get((scheme, second))
        if a is None or b is None:
            continue
        interval = paired_bootstrap(a["per_question"], b["per_question"])
        out.append({"scheme": scheme, "a": first, "b": second, "seeds": min(a["seeds"], b["seeds"]),
                    "answer_kl": [a["answer_kl"][0], b["answer_kl"][0]], **interval, "verdict": verdict(interval)})
    return out


def markdown(entries: list[dict]) -> str:
    lines = ["| scheme | A | B | answer KL A / B (mean of seeds) | accuracy A - B, 95% CI | KL A / B, 95% CI "
             "| A vs B |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        (acc_low, acc_high), (kl_low, kl_high) = e["accuracy_diff"], e["kl_ratio"]
        lines.append(f"| {e['scheme']} | {e['a']} | {e['b']} | {e['answer_kl'][0]:.2e} / {e['answer_kl'][1]:.2e} | "
                     f"[{acc_low:+.3f}, {acc_high:+.3f}] | [{kl_low:.2f}, {kl_high:.2f}] | {e['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a `tlq bench --out` folder (its results.json)")
    parser.add_argument("--pair", action="append", required=True, help="A:B, two method names of the table")
    args = parser.parse_args(argv)
    results_path = args.folder / "results.json"
    if not results_path.is_file():
        parser.error(f"no results.json in {args.folder}: pass a folder written by `tlq bench --out`")
    rows = summarize(json.loads(results_path.read_text()))
    methods = {row["method"] for row in rows}
    entries = []
    for pair in args.pair:
        first, _, second = pair.rpartition(":")
        missing = [m for m in (first, second) if m not in methods]
        if missing:
            parser.error(f"{', '.join(missing)} not in {results_path}; its methods: {', '.join(sorted(methods))}")
        entries += compare(rows, first, second)
    (args.folder / "pairs.json").write_text(json.dumps(entries, indent=1) + "\n")
    (args.folder / "pairs.md").write_text(markdown(entries))
    print(markdown(entries), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
