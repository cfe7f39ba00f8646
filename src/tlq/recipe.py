"""Quantization schemes and the calibration recipe.

A `Scheme` says what the deployed model computes with (weight bits, grouping, symmetry, activation bits);
a `Recipe` says how tlq calibrates it (method, data budget, seed, GPTQ options). Both are plain
dataclasses that round-trip through JSON, so the recipe saved beside a checkpoint re-creates the run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlq.errors import TlqError

METHODS = ("rtn", "gptq", "awq", "smoothquant", "mbq", "tlq", "awq_gptq", "smoothquant_gptq")
IMPORTANCE_SCORES = ("fisher", "l2", "gx", "layer_output")  # tlq.importance computes them
BACKENDS = ("auto", "gptq", "scale", "both")
TARGETS = ("symmetric", "asymmetric")


@dataclass(frozen=True)
class MethodPlan:
    """What a method runs on each layer: a rescaling transform, a weight solver, a token weighting."""

    transform: str | None  # None | "scale_search" | "smoothquant"
    solver: str  # "rtn" | "gptq"
    weighting: str  # "uniform" | "modality" (MBQ) | "importance" (TLQ)

    @property
    def needs_activation_scheme(self) -> bool:
        return self.transform == "smoothquant"  # it migrates activation outliers into the weights


# The baselines as compositions; TLQ's depends on its backend (Recipe.plan). awq_gptq and smoothquant_gptq
# are the strongest recipes llm-compressor documents (AWQ / SmoothQuant scales, then GPTQ).
BASELINE_PLANS = {
    "rtn": MethodPlan(None, "rtn", "uniform"),
    "gptq": MethodPlan(None, "gptq", "uniform"),
    "awq": MethodPlan("scale_search", "rtn", "uniform"),
    "awq_gptq": MethodPlan("scale_search", "gptq", "uniform"),
    "smoothquant": MethodPlan("smoothquant", "rtn", "uniform"),
    "smoothquant_gptq": MethodPlan("smoothquant", "gptq", "uniform"),
    "mbq": MethodPlan("scale_search", "rtn", "modality"),
}


@dataclass(frozen=True)
class Scheme:
    """Integer weight (and optionally activation) format of every quantized Linear.

    group_size None means one scale per output channel. Activations, when quantized, are dynamic
    per-token symmetric integers (the scale is computed at run time from each token's max |x|).
    """

    name: str
    weight_bits: int
    group_size: int | None
    symmetric: bool
    act_bits: int | None = None
    # How each weight group's range is chosen: min-max, or a search over shrunken ranges for the least
    # error (tlq.quant.primitives.grid_params). A calibration choice: the stored format is the same.
    grid: str = "minmax"

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits is not None

    def group_for(self, in_features: int) -> int:
        """Columns sharing one scale in a Linear with `in_features` inputs (the group clamped to it)."""
        if self.group_size is None:
            return in_features
        return min(self.group_size, in_features)

    @property
    def weight_qrange(self) -> tuple[int, int]:
        """Signed integer range of the stored weights, as compressed-tensors packs them."""
        return -(2 ** (self.weight_bits - 1)), 2 ** (self.weight_bits - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Weight-only schemes: symmetric, group 128 (what loads everywhere: asymmetric pack-quantized outputs
# fail in plain transformers with compressed-tensors 0.20 and have no Marlin kernel at 8 bits; the cost,
# measured on the validation split, is in benchmarks/results/*/symmetry and docs/serving.md;
# `--no-symmetric` keeps the asymmetric grid). Weight+activation schemes: symmetric per-channel weights,
# dynamic per-token int8 activations (what vLLM's int8 W8A8 / W4A8 kernels run).
_PRESETS = {
    "W2A16": Scheme("W2A16", 2, 128, True),
    "W3A16": Scheme("W3A16", 3, 128, True),
    "W4A16": Scheme("W4A16", 4, 128, True),
    "W8A16": Scheme("W8A16", 8, 128, True),
    "W4A8": Scheme("W4A8", 4, None, True, 8),
    "W8A8": Scheme("W8A8", 8, None, True, 8),
}
SCHEMES = tuple(_PRESETS)


def parse_scheme(text: str, group_size: int | None = None, symmetric: bool | None = None) -> Scheme:
    """Build a Scheme from a preset name such as 'W3A16', optionally with a group suffix ('W3A16-g64').

    `group_size` and `symmetric` override the preset; 0 or -1 as a group size means per channel.
    """
    match = re.fullmatch(r"(W\d+A\d+)(?:[-_:]?g(\d+))?", text.strip().upper().replace("G", "g"))
    if not match or match.group(1) not in _PRESETS:
        raise TlqError(f"unknown scheme {text!r}: use one of {', '.join(SCHEMES)} (optionally with -gN, e.g. W3A16-g64)")
    base = _PRESETS[match.group(1)]
    if match.group(2) is not None:
        if group_size is not None and group_size != int(match.group(2)):
            raise TlqError(f"scheme {text!r} and --group-size {group_size} disagree: give the group size once")
        group_size = int(match.group(2))
    scheme = base
    if group_size is not None:
        scheme = dataclasses.replace(scheme, group_size=None if group_size <= 0 else group_size)
    if symmetric is not None:
        scheme = dataclasses.replace(scheme, symmetric=symmetric)
    validate_scheme(scheme)
    return scheme


def validate_scheme(scheme: Scheme) -> None:
    """Refuse combinations that no kernel runs or that the format cannot store."""
    if not 2 <= scheme.weight_bits <= 8:
        raise TlqError(f"scheme {scheme.name}: weight bits must be 2..8, got {scheme.weight_bits}")
    if scheme.group_size is not None and (scheme.group_size < 8 or scheme.group_size & (scheme.group_size - 1)):
        raise TlqError(f"scheme {scheme.name}: group size must be a power of two >= 8 (32, 64, 128), got {scheme.group_size}")
    if scheme.act_bits is not None:
        if scheme.act_bits != 8:
            raise TlqError(f"scheme {scheme.name}: only 8-bit activations are supported (W4A8, W8A8)")
        if scheme.group_size is not None:
            raise TlqError(
                f"scheme {scheme.name}: weight+activation schemes use per-channel weights; drop the group size"
            )
        if not scheme.symmetric:
            raise TlqError(f"scheme {scheme.name}: int8 activation kernels need symmetric weights")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs: damping (a fraction of the mean Hessian diagonal), lazy-update block width, act-order."""

    dampening: float
    block_size: int
    act_order: bool


@dataclass(frozen=True)
class ScaleSearchConfig:
    """The scale search's knobs (AWQ, MBQ, TLQ's scale backend): alpha steps per candidate form, the loss,
    tokens scored per token-wise block (a subsample drawn with `seed`), the candidate forms."""

    grid: int
    loss: str
    max_tokens: int
    form: str
    seed: int
    alpha_one: bool = False
    rescore_top: int = 0


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant's knobs: migration strength, and the token subsample its statistics are read on."""

    alpha: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class LoopConfig:
    """The layer loop's knobs."""

    true_sequential: bool
    exposure: bool
    target: str
    expert_min_tokens: int
    device: str


@dataclass(frozen=True)
class RunConfig:
    """A Recipe resolved once per run (`Recipe.resolve`). The Recipe is the flat record users write (one
    flag, one name, one default per knob; tlq_recipe.json); each part of a method gets its own frozen
    config from here, so no algorithm reads another's knobs or re-parses the recipe per layer."""

    method: str
    scheme: Scheme
    plan: MethodPlan
    loop: LoopConfig
    gptq: GPTQConfig
    scale_search: ScaleSearchConfig
    smoothquant: SmoothQuantConfig


def knob(default: Any, help: str, group: str = "", choices: tuple | None = None, aliases: tuple[str, ...] = ()):
    """A Recipe field with what `tlq quantize` needs to offer it as a flag (tlq.cli.add_recipe_arguments):
    the flag is the field's name (--num-samples for num_samples), with its one default here. `aliases` are
    older spellings the CLI still accepts."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "aliases": aliases})


TLQ_GROUP = "TLQ / MBQ / AWQ options"


@dataclass
class Recipe:
    """Everything that decides a calibration run; saved as tlq_recipe.json beside the output, and
    `tlq quantize --recipe tlq_recipe.json` runs it again. Every field is a `tlq quantize` flag."""

    method: str = knob("gptq", "calibration algorithm", choices=METHODS)
    scheme: str = knob("W4A16", f"{', '.join(('W2A16', 'W3A16', 'W4A16', 'W8A16', 'W4A8', 'W8A8'))}; "
                                "add -gN for a group size")
    group_size: int | None = knob(None, "override the scheme's group (0 = per channel)")
    symmetric: bool | None = knob(None, "override the scheme's weight symmetry")
    num_samples: int = knob(128, "calibration records to use")
    seed: int = knob(0, "chooses the calibration subset")
    max_length: int = knob(2048, "truncate samples to this many tokens")
    # GPTQ: damping as a fraction of the mean Hessian diagonal, lazy-update block width, act-order.
    dampening: float = knob(0.01, "GPTQ damping, a fraction of the mean Hessian diagonal")
    block_size: int = knob(128, "GPTQ lazy-update block width")
    # act-order: None = the method's default: on where a rescaling transform runs before GPTQ (TLQ,
    # awq_gptq, smoothquant_gptq), off for plain GPTQ. Chosen on the validation split
    # (benchmarks/results/qwen2_vl-large/act_order): after scale search, act-order halved TLQ's answer KL at
    # W3A16; on the unscaled weight-outlier model it made plain GPTQ worse.
    act_order: bool | None = knob(None, "GPTQ act-order with static groups (default: on after a scale search "
                                        "or SmoothQuant, off for plain GPTQ)")
    # Weight grid per group: minmax or mse (a search over shrunken ranges; every solver uses it).
    weight_grid: str = knob("minmax", "each weight group's range: minmax, or mse (searched shrink, least error)",
                            choices=("minmax", "mse"))
    # MoE: an expert's Linears see only the tokens routed to it; with too few, GPTQ's Hessian is too thin to
    # solve on (with none it would zero the weights), so such an expert is rounded to nearest instead.
    expert_min_tokens: int = knob(64, "MoE: an expert routed fewer calibration tokens than this is rounded to "
                                      "nearest (RTN) instead of solved, with a warning")
    # Observe each Linear group after the earlier groups of the same layer are quantized.
    true_sequential: bool = knob(True, "observe each Linear group after the earlier groups of the layer are "
                                       "quantized (--no-true-sequential: all in one pass)")
    # Quantization-exposed calibration: layer l sees the outputs of the quantized layers < l. Off = every
    # layer calibrated on the FP model's activations (ablation only).
    exposure: bool = knob(True, "ablation (--no-exposure): calibrate every layer on FP activations", TLQ_GROUP)
    # What the layer objective compares against: the FP layer on the quantized-path input (symmetric) or
    # on the FP-path input (asymmetric; keeps a second activation stream).
    target: str = knob("symmetric", "objective target", TLQ_GROUP, TARGETS)
    # TLQ: solver backend; auto = both (importance-weighted scale search, then importance-weighted GPTQ).
    backend: str = knob("auto", "tlq solver backend", TLQ_GROUP, BACKENDS)
    importance_score: str = knob("fisher", "token score", TLQ_GROUP, IMPORTANCE_SCORES, aliases=("--importance",))
    # The gradient pass: full (autograd through the whole resident model on one device: 1 forward + 1
    # backward), streamed (one decoder layer on the device, each layer's forward recomputed in the
    # backward: 2 forwards + 1 backward), or auto (full when it fits, tlq.importance.full_pass_fits).
    # Scores agree within 1e-4 relative.
    importance_pass: str = knob("auto", "gradient pass: full (autograd through the whole model on one device), "
                                        "streamed (one layer on the device, layers recomputed), auto (full when "
                                        "it fits)", TLQ_GROUP, ("auto", "streamed", "full"))
    # Token weighting override for ablations: auto (the method's own), uniform, modality, importance.
    weighting: str = knob("auto", "ablation: the token weighting", TLQ_GROUP,
                          ("auto", "uniform", "modality", "importance"))
    importance_floor: float = knob(0.1, "minimum token weight lambda", TLQ_GROUP, aliases=("--floor",))
    importance_clip: float | None = knob(None, "cap on the normalised importance", TLQ_GROUP, aliases=("--clip",))
    keep_ratio: float | None = knob(None, "token-level set: share of tokens kept per Linear", TLQ_GROUP)
    token_budget: int | None = knob(None, "token-level set: tokens kept in all", TLQ_GROUP)
    min_kind_share: float = knob(0.1, "minimum share of the kept tokens for each token kind present", TLQ_GROUP)
    # Scale search (AWQ / MBQ / TLQ scale backend) and SmoothQuant.
    scale_grid: int = knob(20, "scale search: alpha steps per candidate form", TLQ_GROUP)
    # alpha = k / grid stops at (grid - 1) / grid, as AutoAWQ's grid does; llm-compressor's duo grid ends at
    # alpha = 1. Off: alpha = 1 never won on the validation split (benchmarks/results/*/scale_grid).
    scale_alpha_one: bool = knob(False, "scale search: the grid also tries alpha = 1", TLQ_GROUP)
    # Round to nearest only shortlists when k > 0: the k best candidates are scored again with the targets
    # solved by the method's weight solver (GPTQ) on the scored rows' Hessian; no effect with RTN. None = the
    # method's default: every candidate for AWQ + GPTQ, off for the others. Chosen on the validation split
    # (benchmarks/results/qwen2_vl-large/scale_rescore): AWQ + GPTQ's answer KL was lower in 10 of 12
    # seed-cells with all candidates rescored (a shortlist of 4: 5 of 8); TLQ's in 2-4 of 8, higher in the
    # others (likely because its GPTQ weights each Linear's tokens by that Linear's own importance, which the
    # rescoring's one Hessian does not). Cost: a
    # GPTQ solve per candidate (AWQ + GPTQ at 2B widths on a CPU: 3.2x; benchmarks/results/cost/README.md).
    scale_rescore_top: int | None = knob(None, "scale search: score the K best candidates again after the "
                                               "method's GPTQ solve and keep the best of those (0 = off; "
                                               "default: every candidate for awq_gptq, off otherwise)", TLQ_GROUP)
    scale_loss: str = knob("auto", "scale search loss (auto: mae for MBQ as published, mse otherwise)", TLQ_GROUP,
                           ("auto", "mse", "mae"))
    scale_max_tokens: int = knob(16384, "scale search: tokens scored per token-wise block (a random subsample)",
                                 TLQ_GROUP)
    # Candidate scales: activation (s = x^alpha, the AWQ paper), duo (x^alpha / w^(1-alpha), AutoAWQ's and
    # llm-compressor's default) or both (the search keeps the better). auto: duo for AWQ + GPTQ, both for the
    # others; chosen on the validation split (benchmarks/results/*/scale_form): the search scores candidates
    # with round-to-nearest, and for AWQ + GPTQ the activation form's picks did not survive the GPTQ solve.
    scale_form: str = knob("auto", "scale candidates: activation (x^a), duo (x^a / w^(1-a)) or both (auto: duo "
                                   "for awq_gptq, both otherwise)", TLQ_GROUP, ("auto", "activation", "duo", "both"))
    smooth_alpha: float = knob(0.5, "SmoothQuant migration strength", TLQ_GROUP)
    device: str = knob("auto", "auto, cpu, cuda, cuda:N")
    extra: dict[str, Any] = field(default_factory=dict)  # not a flag: free-form notes kept with the recipe

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TlqError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.num_samples < 1:
            raise TlqError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_length < 16:
            raise TlqError(f"--max-length must be >= 16, got {self.max_length}")
        if not 0 < self.dampening < 1:
            raise TlqError(f"dampening must be in (0, 1), got {self.dampening}")
        if self.block_size < 1:
            raise TlqError(f"block size must be >= 1, got {self.block_size}")
        if self.expert_min_tokens < 0:
            raise TlqError(f"--expert-min-tokens must be >= 0, got {self.expert_min_tokens}")
        if self.target not in TARGETS:
            raise TlqError(f"unknown target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.backend not in BACKENDS:
            raise TlqError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.importance_pass not in ("auto", "streamed", "full"):
            raise TlqError(f"unknown importance pass {self.importance_pass!r}: use auto, streamed or full")
        if self.weighting not in ("auto", "uniform", "modality", "importance"):
            raise TlqError(f"unknown weighting {self.weighting!r}: use auto, uniform, modality or importance")
        if self.weight_grid not in ("minmax", "mse"):
            raise TlqError(f"unknown weight grid {self.weight_grid!r}: use minmax or mse")
        if self.scale_form not in ("auto", "activation", "duo", "both"):
            raise TlqError(f"unknown scale form {self.scale_form!r}: use auto, activation, duo or both")
        if self.scale_loss not in ("auto", "mse", "mae"):
            raise TlqError(f"unknown scale loss {self.scale_loss!r}: use auto, mse or mae")
        if self.importance_score not in IMPORTANCE_SCORES:
            raise TlqError(f"unknown importance score {self.importance_score!r}: use one of "
                           f"{', '.join(IMPORTANCE_SCORES)}")
        if self.importance_clip is not None and not self.importance_clip > 0:
            raise TlqError(f"--clip must be > 0, got {self.importance_clip}")
        if not 0 <= self.min_kind_share < 1:
            raise TlqError(f"--min-kind-share must be in [0, 1), got {self.min_kind_share}")
        if self.scale_rescore_top is not None and self.scale_rescore_top < 0:
            raise TlqError(f"--scale-rescore-top must be >= 0, got {self.scale_rescore_top}")
        if self.scale_grid < 1 or self.scale_max_tokens < 1 or not 0 <= self.smooth_alpha <= 1:
            raise TlqError("scale_grid and scale_max_tokens must be >= 1 and smooth_alpha in [0, 1]")
        if not 0 <= self.importance_floor <= 1:
            raise TlqError(f"importance floor must be in [0, 1], got {self.importance_floor}")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise TlqError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio}")
        if self.token_budget is not None and self.token_budget < 1:
            raise TlqError(f"--token-budget must be >= 1, got {self.token_budget}")
        if self.keep_ratio is not None and self.token_budget is not None:
            raise TlqError("give either --keep-ratio or --token-budget, not both")
        scheme = self.resolved_scheme()  # validate early
        if self.plan().needs_activation_scheme and not scheme.quantizes_activations:
            raise TlqError(f"{self.method} migrates activation outliers: use it with W4A8 or W8A8")
        if (self.keep_ratio is not None or self.token_budget is not None) and self.plan().weighting != "importance":
            raise TlqError("a token budget selects tokens by importance: use it with --method tlq")

    def plan(self) -> MethodPlan:
        plan = self._method_plan()
        if self.weighting != "auto":
            plan = MethodPlan(plan.transform, plan.solver, self.weighting)
        return plan

    def _method_plan(self) -> MethodPlan:
        if self.method in BASELINE_PLANS:
            return BASELINE_PLANS[self.method]
        backend = self.backend
        if backend == "auto":
            # Chosen on the validation split (benchmarks/results/qwen2_vl-small/validation): scale search then
            # GPTQ beat GPTQ alone at W3A16 (0.999 vs 0.914) and W4A8 (1.000 vs 0.258); the same held on the
            # model before (qwen2_vl-small-v2) and on qwen2_vl-large (0.951 vs 0.927 and 0.345).
            backend = "both"
        return {"gptq": MethodPlan(None, "gptq", "importance"),
                "scale": MethodPlan("scale_search", "rtn", "importance"),
                "both": MethodPlan("scale_search", "gptq", "importance")}[backend]

    @property
    def act_order_resolved(self) -> bool:
        if self.act_order is not None:
            return self.act_order
        plan = self.plan()
        return plan.solver == "gptq" and plan.transform is not None

    @property
    def scale_loss_resolved(self) -> str:
        if self.scale_loss != "auto":
            return self.scale_loss
        return "mae" if self.method == "mbq" else "mse"

    @property
    def scale_rescore_top_resolved(self) -> int:
        if self.scale_rescore_top is not None:
            return self.scale_rescore_top
        return 2 * self.scale_grid + 3 if self.method == "awq_gptq" else 0  # more than the grid's candidates

    @property
    def scale_form_resolved(self) -> str:
        if self.scale_form != "auto":
            return self.scale_form
        return "duo" if self.method == "awq_gptq" else "both"

    def resolve(self) -> "RunConfig":
        """The recipe resolved once per run: the scheme, the method's plan, and one frozen config per part,
        each holding only its own knobs (what a solver, a transform or the loop reads)."""
        return RunConfig(
            method=self.method, scheme=self.resolved_scheme(), plan=self.plan(),
            loop=LoopConfig(true_sequential=self.true_sequential, exposure=self.exposure, target=self.target,
                            expert_min_tokens=self.expert_min_tokens, device=self.device),
            gptq=GPTQConfig(dampening=self.dampening, block_size=self.block_size, act_order=self.act_order_resolved),
            scale_search=ScaleSearchConfig(grid=self.scale_grid, loss=self.scale_loss_resolved,
                                           max_tokens=self.scale_max_tokens, form=self.scale_form_resolved, seed=self.seed,
                                           alpha_one=self.scale_alpha_one, rescore_top=self.scale_rescore_top_resolved),
            smoothquant=SmoothQuantConfig(alpha=self.smooth_alpha, max_tokens=self.scale_max_tokens, seed=self.seed))

    def resolved_scheme(self) -> Scheme:
        scheme = parse_scheme(self.scheme, self.group_size, self.symmetric)
        return scheme if self.weight_grid == "minmax" else dataclasses.replace(scheme, grid=self.weight_grid)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TlqError(f"recipe has unknown keys {unknown}: known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TlqError(f"cannot read recipe {path}: {exc}") from None
        return cls.from_dict(data.get("recipe", data))
