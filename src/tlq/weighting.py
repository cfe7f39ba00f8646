"""From the gradient pass's scores to the engine's token weights: TLQ's per-token weights and token-level
set (normalise, floor, clip, keep the tokens that matter), MBQ's per-modality weights, and the registry of
token weightings a method names (`WEIGHTINGS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tlq.context import TokenWeights
from tlq.errors import TlqError
from tlq.importance import TokenImportance
from tlq.models import ANSWER, IMAGE, PROMPT, TOKEN_KIND_NAMES, VIDEO, ModelAdapter
from tlq.recipe import Recipe
from tlq.registry import Registry


@dataclass
class WeightingConfig:
    """The importance weighting's knobs; defaults are the Recipe's (one default per knob)."""

    floor: float = Recipe.importance_floor  # lam: every token keeps at least this weight
    clip: float | None = Recipe.importance_clip  # cap on the normalised score (outlier clip), None = no cap
    keep_ratio: float | None = Recipe.keep_ratio  # token-level set: keep this share of tokens per Linear
    token_budget: int | None = Recipe.token_budget  # ... or this many tokens in all
    min_share: float = Recipe.min_kind_share  # each present token kind gets at least this share of the kept tokens

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "WeightingConfig":
        return cls(floor=recipe.importance_floor, clip=recipe.importance_clip, keep_ratio=recipe.keep_ratio,
                   token_budget=recipe.token_budget, min_share=recipe.min_kind_share)


def _normalise(score: torch.Tensor, floor: float, clip: float | None) -> torch.Tensor:
    a = score / score.mean().clamp_min(1e-30)
    if clip is not None:
        a = a.clamp(max=clip)
    return floor + (1.0 - floor) * a


def select_tokens(score: torch.Tensor, kinds: torch.Tensor, budget: int, min_share: float,
                  tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of `budget` tokens with the highest score, each present kind getting a minimum share.

    Ties (e.g. zero gradient at the last layer for everything but the answer) are broken by `tie_break`.
    """
    total = score.numel()
    budget = max(1, min(budget, total))
    key = score.double()
    if tie_break is not None:
        key = key + 1e-9 * tie_break.double() / tie_break.double().abs().max().clamp_min(1e-30) * key.abs().max()
    keep = torch.zeros(total, dtype=torch.bool)
    for kind in kinds.unique():
        members = (kinds == kind).nonzero().squeeze(1)
        quota = min(len(members), int(round(min_share * budget)))
        if quota:
            keep[members[key[members].topk(quota).indices]] = True
    remaining = budget - int(keep.sum())
    if remaining > 0:
        rest = key.masked_fill(keep, float("-inf"))
        keep[rest.topk(remaining).indices] = True
    return keep


def token_weights(importance: TokenImportance, config: WeightingConfig | None = None) -> TokenWeights:
    """The engine's per-(layer, Linear, sample) token weights from raw scores (+ token-level set)."""
    config = config or WeightingConfig()
    weights: dict[str, list[torch.Tensor]] = {}
    lengths = [len(k) for k in importance.token_kinds]
    kinds = torch.cat(importance.token_kinds)
    layer_mean: dict[str, torch.Tensor] = {}
    if config.keep_ratio is not None or config.token_budget is not None:
        per_layer: dict[str, list[torch.Tensor]] = {}
        for key, per_sample in importance.scores.items():
            normalised = torch.cat([s / s.mean().clamp_min(1e-30) for s in per_sample])
            per_layer.setdefault(key.split(".", 1)[0], []).append(normalised)
        layer_mean = {k: torch.stack(v).mean(0) for k, v in per_layer.items()}
    for key, per_sample in importance.scores.items():
        w = torch.cat([_normalise(s, config.floor, config.clip) for s in per_sample])
        if layer_mean:
            budget = config.token_budget or int(round(config.keep_ratio * len(w)))
            keep = select_tokens(w, kinds, budget, config.min_share, layer_mean[key.split(".", 1)[0]])
            w = torch.where(keep, w, torch.zeros_like(w))
        weights[key] = list(torch.split(w, lengths))

    def lookup(layer: int, name: str, sample: int) -> torch.Tensor:
        return weights[f"{layer}.{name}"][sample]

    return lookup


def kept_tokens(importance: TokenImportance, lookup: TokenWeights, layer: int, name: str) -> dict[str, int]:
    """How many tokens of each kind enter the statistics of one Linear (for the report)."""
    w = torch.cat([lookup(layer, name, i) for i in range(len(importance.token_kinds))])
    kinds = torch.cat(importance.token_kinds)
    return {n: int(((kinds == i) & (w > 0)).sum()) for i, n in enumerate(TOKEN_KIND_NAMES)}


def modality_ratios(importance: TokenImportance, adapter: ModelAdapter, kind: int = IMAGE) -> dict[int, dict[str, float]]:
    """MBQ: per layer and block, rho = mean|g| over image (or video: `kind`) tokens / mean|g| over answer
    tokens, read at the block's output Linear (the attention and MLP outputs; an MoE block's is the sum over
    its experts' outputs, each zero where the token was not routed to it), floored at its median over layers."""
    kinds = torch.cat(importance.token_kinds)
    layers = sorted({int(key.split(".", 1)[0]) for key in importance.abs_grad})
    raw: dict[str, dict[int, float]] = {block.role: {} for block in adapter.blocks}
    for layer in layers:
        for block in adapter.blocks:
            parts = [importance.abs_grad.get(f"{layer}.{name}") for name in block.outputs]
            if any(part is None for part in parts):
                continue
            g = sum(torch.cat(part) for part in parts)
            image, answer = g[kinds == kind], g[kinds == ANSWER]
            if len(answer) == 0 or answer.mean() == 0:
                raise TlqError("MBQ needs answer tokens with a gradient in the calibration samples")
            raw[block.role][layer] = float(image.mean() / answer.mean()) if len(image) else 0.0
    ratios: dict[int, dict[str, float]] = {}
    for role, per_layer in raw.items():
        if not per_layer:
            continue
        median = float(torch.tensor(list(per_layer.values())).median())
        for layer, rho in per_layer.items():
            ratios.setdefault(layer, {})[role] = max(rho, median)
    return ratios


def modality_weights(importance: TokenImportance, adapter: ModelAdapter) -> TokenWeights:
    """MBQ token weights: image and video tokens their modality's rho (per layer and block), answer tokens 1,
    prompt tokens 0."""
    ratios = {kind: modality_ratios(importance, adapter, kind) for kind in _vision_kinds(importance)}

    def lookup(layer: int, name: str, sample: int) -> torch.Tensor:
        kinds = importance.token_kinds[sample]
        role = adapter.block_of(name).role
        w = torch.zeros(len(kinds))
        for kind, per_layer in ratios.items():
            w[kinds == kind] = per_layer[layer][role]
        w[kinds == ANSWER] = 1.0
        w[kinds == PROMPT] = 0.0
        return w

    return lookup


def _vision_kinds(importance: TokenImportance) -> tuple[int, ...]:
    """IMAGE always (its ratio also checks the answer tokens); VIDEO where the samples have video tokens."""
    present = set(torch.cat(importance.token_kinds).unique().tolist())
    return (IMAGE,) + ((VIDEO,) if VIDEO in present else ())


__all__ = ["WEIGHTINGS", "Weighting", "WeightingConfig", "kept_tokens", "modality_ratios", "modality_weights",
           "register_weighting", "select_tokens", "token_weights"]


@dataclass(frozen=True)
class Weighting:
    """A token weighting built from the gradient pass: `build(importance, adapter, recipe, layers)` returns
    the engine's lookup and what the run record says about it (`layers`: the decoder's layer count)."""

    name: str
    build: Callable[[TokenImportance, ModelAdapter, Recipe, int], tuple[TokenWeights, dict[str, Any]]]


WEIGHTINGS: Registry[Weighting] = Registry("token weighting")


def register_weighting(weighting: Weighting) -> Weighting:
    return WEIGHTINGS.add(weighting.name, weighting)


def _modality(importance: TokenImportance, adapter: ModelAdapter, recipe: Recipe, layers: int):
    record = {}
    for kind in _vision_kinds(importance):
        ratios = modality_ratios(importance, adapter, kind)
        record[f"{TOKEN_KIND_NAMES[kind]}_weight_per_layer"] = {
            str(k): {p: round(v, 5) for p, v in r.items()} for k, r in ratios.items()}
    return modality_weights(importance, adapter), record


def _importance(importance: TokenImportance, adapter: ModelAdapter, recipe: Recipe, layers: int):
    config = WeightingConfig.from_recipe(recipe)
    lookup = token_weights(importance, config)
    record: dict[str, Any] = {"score": recipe.importance_score}
    if config.keep_ratio is not None or config.token_budget is not None:
        record["kept_tokens_by_kind"] = {
            f"{layer}.{name}": kept_tokens(importance, lookup, layer, name)
            for layer in (0, layers - 1) for name in (adapter.linear_names[0], adapter.blocks[-1].outputs[0])}
    return lookup, record


register_weighting(Weighting("modality", _modality))  # MBQ: per-modality ratios of gradient magnitudes
register_weighting(Weighting("importance", _importance))  # TLQ: per-token, per-Linear gradient scores
