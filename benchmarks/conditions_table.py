"""The importance-conditions ablation in one table: every method variant against TLQ's default, per condition.

    .venv/bin/python benchmarks/conditions_table.py benchmarks/results/qwen2_vl-large/importance_conditions

Reads each condition's `tlq bench` results.json (benchmarks/reference.sh conditions: calibrated on that
condition's pool, scored on the standard test split), pools the seeds per question and compares each variant
with `tlq` on the same questions (paired bootstrap, tlq.stats). Writes ablation.json and ablation.md beside
the condition folders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tlq.bench import summarize
from tlq.stats import paired_bootstrap, verdict

CONDITIONS = ("standard", "background", "padded", "multi_image", "long_prompt")
REFERENCE = "tlq"


def condition_rows(results: dict) -> dict[str, dict]:
    rows = {row["method"]: row for row in summarize(results)}
    reference = rows.get(REFERENCE, {}).get("per_question")
    out = {}
    for method, row in rows.items():
        entry = {"accuracy": row["accuracy"][0], "answer_kl": row["answer_kl"][0], "seeds": row["seeds"]}
        if method != REFERENCE and reference is not None and "per_question" in row:
            interval = paired_bootstrap(row["per_question"], reference)
            entry["versus_tlq"] = {**interval, "verdict": verdict(interval)}
        out[method] = entry
    return out


def main(folder: Path) -> int:
    table = {c: condition_rows(json.loads((folder / c / "results.json").read_text()))
             for c in CONDITIONS if (folder / c / "results.json").exists()}
    methods = list(dict.fromkeys(m for rows in table.values() for m in rows))
    lines = ["Calibrated on each condition's pool (`tlq synth --condition`), scored on the standard test split. "
             "Cell: accuracy / answer KL (mean of the seeds); below it, the variant's answer-KL ratio to TLQ's "
             "default (95% CI, paired bootstrap over questions, seeds pooled) and the verdict of the variant "
             "against TLQ (better = the variant beats TLQ).", "",
             "| method | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    for method in methods:
        cells = []
        for rows in table.values():
            row = rows.get(method)
            if row is None:
                cells.append("")
                continue
            text = f"{row['accuracy']:.3f} / {row['answer_kl']:.1e}"
            versus = row.get("versus_tlq")
            if versus:
                low, high = versus["kl_ratio"]
                text += f"<br>KL x[{low:.2f}, {high:.2f}] {versus['verdict']}"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (folder / "ablation.json").write_text(json.dumps(table, indent=1) + "\n")
    (folder / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else
                               "benchmarks/results/qwen2_vl-large/importance_conditions")))
