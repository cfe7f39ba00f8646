"""Is one method better than another on the same questions? Paired bootstrap over questions.

Per-question results are dicts of equal-length lists: `exact` (0/1, or a mean over seeds), `kl` (the
answer's summed KL to the FP model) and `tokens` (answer tokens). Seeds are averaged per question first
(`averaged`), so the bootstrap resamples questions, the unit the intervals speak about, not seeds.
"""

from __future__ import annotations

import torch

BOOTSTRAP_DRAWS = 2000


def averaged(runs: list[dict]) -> dict:
    """Per question, the mean over runs (seeds) of exact, kl and tokens."""
    count = len(runs)
    return {key: [sum(values) / count for values in zip(*(r[key] for r in runs))] for key in ("exact", "kl", "tokens")}


def paired_bootstrap(a: dict, b: dict, seed: int = 0, draws: int = BOOTSTRAP_DRAWS) -> dict:
    """95% intervals of accuracy(a) - accuracy(b) and KL(a) / KL(b), questions resampled together."""
    exact_a, exact_b = torch.tensor(a["exact"]), torch.tensor(b["exact"])
    kl_a, kl_b = torch.tensor(a["kl"], dtype=torch.float64), torch.tensor(b["kl"], dtype=torch.float64)
    if len(exact_a) != len(exact_b):
        raise ValueError(f"paired comparison of {len(exact_a)} and {len(exact_b)} questions: not the same questions")
    n = len(exact_a)
    picks = torch.randint(0, n, (draws, n), generator=torch.Generator().manual_seed(seed))
    accuracy = (exact_a[picks] - exact_b[picks]).mean(1)
    ratio = kl_a[picks].sum(1) / kl_b[picks].sum(1).clamp_min(1e-30)
    low, high = (torch.quantile(accuracy.double(), q).item() for q in (0.025, 0.975))
    kl_low, kl_high = (torch.quantile(ratio.double(), q).item() for q in (0.025, 0.975))
    return {"accuracy_diff": [low, high], "kl_ratio": [kl_low, kl_high]}


def verdict(interval: dict) -> str:
    """better / worse when either metric's interval excludes no change (and the other does not disagree)."""
    acc_low, acc_high = interval["accuracy_diff"]
    kl_low, kl_high = interval["kl_ratio"]
    better = acc_low > 0 or kl_high < 1
    worse = acc_high < 0 or kl_low > 1
    return "better" if better and not worse else "worse" if worse and not better else "tie" if not better else "mixed"


def pooled_kl(per_question: dict) -> float:
    """Answer KL per answer token over all questions."""
    return sum(per_question["kl"]) / max(sum(per_question["tokens"]), 1)


def versus_best_other(pooled: dict[str, dict]) -> dict[str, dict]:
    """For each method (name -> averaged per-question results), the interval and verdict against the best
    other method: the one with the lowest answer KL (accuracy cannot rank methods that all sit within noise
    of FP; KL can)."""
    out = {}
    for method, answers in pooled.items():
        others = [m for m in pooled if m != method]
        if not others:
            continue
        best = min(others, key=lambda m: pooled_kl(pooled[m]))
        interval = paired_bootstrap(answers, pooled[best])
        out[method] = {"method": best, **interval, "verdict": verdict(interval)}
    return out
