"""tlq.stats: paired comparisons of methods on the same questions, and tlq bench's use of them."""

import pytest
import torch

from tlq import bench, stats


def _answers(exact, kl):
    return {"exact": list(map(float, exact)), "kl": list(map(float, kl)), "tokens": [2] * len(exact)}


def test_bootstrap_separates_a_clear_winner_and_ties_identical_methods():
    generator = torch.Generator().manual_seed(0)
    kl = torch.rand(400, generator=generator).tolist()
    base = _answers([1] * 300 + [0] * 100, kl)
    better = _answers([1] * 360 + [0] * 40, [k / 3 for k in kl])
    assert stats.verdict(stats.paired_bootstrap(better, base)) == "better"
    assert stats.verdict(stats.paired_bootstrap(base, better)) == "worse"
    same = stats.paired_bootstrap(base, base)
    assert same["accuracy_diff"] == [0.0, 0.0] and stats.verdict(same) == "tie"


def test_seeds_are_averaged_per_question():
    pooled = stats.averaged([_answers([1, 0], [0.2, 0.4]), _answers([0, 0], [0.4, 0.0])])
    assert pooled["exact"] == [0.5, 0.0] and pooled["kl"] == pytest.approx([0.3, 0.2])


def test_every_method_is_compared_with_the_lowest_kl_other_method():
    generator = torch.Generator().manual_seed(1)
    kl = (torch.rand(300, generator=generator) + 0.5).tolist()
    pooled = {"a": _answers([1] * 300, kl), "b": _answers([1] * 300, [k / 4 for k in kl]),
              "c": _answers([1] * 300, [k * 4 for k in kl])}
    versus = stats.versus_best_other(pooled)
    assert versus["a"]["method"] == "b" and versus["a"]["verdict"] == "worse"
    assert versus["b"]["method"] == "a" and versus["b"]["verdict"] == "better"
    assert versus["c"]["method"] == "b" and versus["c"]["kl_ratio"][0] > 1
    with pytest.raises(ValueError, match="not the same questions"):
        stats.paired_bootstrap(pooled["a"], _answers([1], [1.0]))


def test_bench_table_pools_seeds_per_question_and_states_the_verdict():
    def cell(method, seed, kl):
        return {"status": "done", "method": method, "scheme": "W3A16", "seed": seed, "accuracy": 1.0,
                "retention": 1.0, "answer_kl": sum(kl) / (2 * len(kl)), "calibration_seconds": 1.0,
                "peak_rss_mib": 100.0, "per_question": _answers([1] * len(kl), kl)}

    kl = [0.1 + 0.01 * (i % 7) for i in range(200)]
    results = {"fp": {"accuracy": 1.0, "num_questions": 200}, "config": {"methods": ["tlq", "rtn"]},
               "cells": {f"{m}|W3A16|{s}": cell(m, s, [k * (1 if m == "tlq" else 5 + s) for k in kl])
                         for m in ("tlq", "rtn") for s in (0, 1)}}
    rows = {row["method"]: row for row in bench.summarize(results)}
    assert rows["rtn"]["per_question"]["kl"][0] == pytest.approx(0.1 * 5.5)  # mean of the two seeds
    assert rows["tlq"]["versus_best_other"]["verdict"] == "better"
    table = bench.markdown_table(results)
    assert "| W3A16 | tlq | 2 |" in table and "rtn: [+0.000, +0.000]; [0.18, 0.18]x | better |" in table
    # cells from before per-question results were kept: the row is printed without a comparison
    del results["cells"]["rtn|W3A16|0"]["per_question"]
    assert "versus_best_other" not in {m: r for m, r in ((r["method"], r) for r in bench.summarize(results))}["tlq"]
