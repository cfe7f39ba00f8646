"""`tlq plan`: will a calibration run fit on N devices of a given size? From config.json alone.

The model is instantiated on the meta device (shapes only, no memory, no weights), so every count below
comes from the real transformers classes rather than from a formula per family. Per rank, with
s = ceil(samples / N) samples of T tokens, hidden size d and element size b:

device (the peak of the phases)
    capture     vision tower + embeddings, one image in flight
    gradient    one decoder layer + one sample's autograd activations, or the LM head and its logits
    scale search (AWQ, MBQ, TLQ) one decoder layer + the largest scaling group's data and the working
                memory of scoring one candidate on a chunk of rows (_scale_search_bytes)
    calibrate   one decoder layer + the old weights of the Linear group being replaced (the FP
                layer's outputs are taken before the solves, so no FP copy is kept; the asymmetric
                target keeps one), the larger of GPTQ's observe peak (float64 upper-block Gram sums of
                the group, one block product, a chunk of inputs) and its solve peak (float32 H, one
                work copy, half-size retry rows; none for a method that rounds to nearest), one sample's activations
host
    model weights           the whole checkpoint; with --lazy only what is outside the decoder + one layer
    loading overhead        what loading a checkpoint leaves resident above its parameters (a measured
                            constant: benchmarks/results/cost/rss_probe)
    layer call arguments    s x K x 2 x T x h x b: each sample's rotary tables (cos, sin; h the head width), which
                            every layer is called with, kept for the whole run; K the number of layer kinds that
                            are called with their own (Gemma 3's sliding-window and global layers: 2). Masks are
                            not counted (none is built for an unpadded single-sample call under SDPA), nor the
                            DeepStack features Qwen3-VL adds to its first layers
    layer-input cache       2 x s x T x d x b (the layer's inputs, and beside them the solved attention's
                            outputs recorded for replay (tlq.replay), which propagation frees as it fills
                            the layer's outputs) + the FP layer's outputs
                            on at most 16 samples (the error report, engine.REPORT_SAMPLES), + 2 x for an
                            FP stream (asymmetric target); --offload-dir moves it to disk
    gradient pass           (L + 1) x s x T x d x b (each layer's stored inputs; freed before calibration),
                            only for the methods that run it (TLQ, MBQ)
    scale-search capture    one scaling group's data at a time (tlq.rescale), during calibration: the
                            attention's calls and its FP output rows (2 x s x T x d x b; its targets' input rows
                            once more, as a third, only when the search rescores with GPTQ; on a GPU the calls
                            also copy each sample's rotary tables to the host), or a token-wise group's draw of
                            at most --scale-max-tokens rows with the FP block's outputs on them (the MLP down
                            projection: min(s x T, max) x (intermediate + d) x b), the larger; only for methods
                            with a scale search (an MoE block: the router's input on the draw, and every
                            expert's gate/up weights fake-quantized at once while a candidate is scored)
The samples' pixel values are released once layer 0's inputs are captured, so they are not counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlq.distributed import samples_per_chunk
from tlq.errors import TlqError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30,
          "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '80GB', '24G' (binary), '1.5TiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise TlqError(f"cannot read memory size {text!r}: write it like 24GiB, 80GB or 16G")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _gib(n: float) -> float:
    return round(n / 2**30, 2)


@dataclass
class ModelShape:
    name: str
    model_type: str
    total_params: int
    vision_params: int
    embed_params: int
    head_params: int
    layer_params: int
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    linear_groups_in: list[list[int]] = field(default_factory=list)  # in_features per Linear, per solve group
    linear_groups_names: list[list[str]] = field(default_factory=list)  # the Linears of each solve group
    row_parallel: tuple[str, ...] = ()  # the Linears whose inputs tensor parallelism splits
    routed_experts: bool = False  # an MoE model (tlq.models.moe)
    linear_groups_params: list[int] = field(default_factory=list)  # weight elements per solve group
    head_dim: int = 0  # the width of the rotary tables every layer is called with
    call_kinds: int = 1  # how many kinds of layer call, each with its own tables (Gemma 3: 2)


def model_shape(model_dir: str | Path) -> ModelShape:
    """Shapes of the checkpoint's model, built on the meta device from its config."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tlq.activations import layer_kinds
    from tlq.models import adapter_for, load_config, read_model_type, with_expert_linears

    adapter = adapter_for(read_model_type(model_dir))
    config = load_config(model_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
        adapter = with_expert_linears(model, adapter)  # MoE: one Linear per expert, as calibrated
    layers = adapter.layers(model)
    layer = layers[0]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    text = config.get_text_config()
    embed = model.get_input_embeddings()
    head = model.get_submodule(adapter.lm_head)
    tied = head.weight is embed.weight
    decoder = model.get_submodule(adapter.decoder_layers.rpartition(".")[0])
    total = count(model)
    vision = total - count(decoder) - (0 if tied else count(head))
    return ModelShape(
        name=Path(model_dir).name, model_type=config.model_type, total_params=total, vision_params=vision,
        embed_params=count(embed), head_params=count(head), layer_params=count(layer), num_layers=len(layers),
        hidden=text.hidden_size, intermediate=text.intermediate_size, heads=text.num_attention_heads,
        vocab=text.vocab_size,
        linear_groups_in=[[layer.get_submodule(n).in_features for n in group] for group in adapter.linear_groups],
        linear_groups_names=[list(group) for group in adapter.linear_groups], row_parallel=adapter.row_parallel,
        routed_experts=adapter.experts is not None,
        linear_groups_params=[sum(layer.get_submodule(n).weight.numel() for n in group)
                              for group in adapter.linear_groups],
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        call_kinds=len(set(layer_kinds(model, len(layers)) or ("all",))),
    )


def _upper_gram_elements(n: int) -> int:
    """Elements of the Gram sums GPTQ keeps for an n-wide Linear: its row blocks on and above the diagonal."""
    from tlq.quant.gptq import gram_blocks

    return sum((stop - start) * (n - start) for start, stop in gram_blocks(n))


def _solver_bytes(groups_in: list[list[int]], chunk_tokens: int, b: int) -> tuple[int, int]:
    """GPTQ's peak while observing (every Linear's float64 sums, one float32 block product, the chunk of
    inputs waiting to be added) and while solving the widest Linear (the others' sums stay alive; its own
    sums become float32 rows, then H and one work copy in place: tlq.quant.gptq)."""
    from tlq.quant.gptq import GRAM_BLOCK

    observe = max(sum(_upper_gram_elements(n) for n in group) * 8 + GRAM_BLOCK * max(group) * 4
                  + chunk_tokens * sum(group) * b for group in groups_in)
    solve = 0
    for group in groups_in:
        for position, n in enumerate(group):
            others = sum(_upper_gram_elements(m) for i, m in enumerate(group) if i > position) * 8
            own = _upper_gram_elements(n)
            solve = max(solve, others + max(own * 12 + n * n * 4, own * 4 + 2 * n * n * 4))
    return observe, solve


# Resident bytes a loaded checkpoint costs above its parameters (transformers' model code and loading, the
# safetensors pages): 107-146 MiB at hidden 512-2048 (benchmarks/results/cost/rss_probe).
LOADING_OVERHEAD = 128 * 2**20


def _scale_search_bytes(shape: ModelShape, tokens: int, max_tokens: int | None, b: int,
                        sample_acts: int, rescore: bool = False) -> tuple[int, int, int]:
    """(host data, device data + working, working) of the scale search's most expensive group (tlq.rescale),
    each the largest over the groups. The attention group's captured calls and FP output rows, every
    token's, stay on the host (its block runs one sample at a time, moved to the device as it runs); its
    targets' input rows are kept, and moved to the device, only to rescore with GPTQ. A token-wise group's
    draw of at most `max_tokens` rows (the MLP's input and the down projection's, with the FP block's
    outputs on them) is on both. The working memory is what scoring one candidate on a chunk of rows
    allocates: the chunk's intermediates (three MLP-wide tensors at once in the gated MLP) and the scaled,
    fake-quantized copies of the targets' weights (about three weight-sized float32 tensors each). With
    `rescore` (candidates scored after GPTQ) the group's input Hessian too (4 x in^2 bytes, float32), kept for
    the whole search, and beside it either a candidate's solve (its rescaled copy, the solve's workspace: 8 x
    in^2) or the candidate's forwards, never both: each candidate's weights are solved, and the solve's
    buffers freed, before its block runs. The Hessian's build (float64 upper-block sums, float32 blocks and
    result: about 11 x in^2) comes before any of them and is below their sum (measured at 8960 wide, the solve
    with its weight-sized copies: 8.8 x in^2; benchmarks/results/cost/rescore_probe). Zeros without a scale
    search."""
    if max_tokens is None:
        return 0, 0, 0
    from tlq.group_data import CHUNK

    d, f = shape.hidden, shape.intermediate
    drawn = min(tokens, max_tokens)
    chunk = min(CHUNK, drawn)
    weights = 3 * d * f * 4

    def candidate(forwards: int, width: int) -> int:  # a candidate's forwards, or with `rescore` its solve
        return 4 * width * width + max(forwards, 8 * width * width) if rescore else forwards

    rows = tokens * d * b if rescore else 0  # the attention's targets' input rows
    groups = [(2 * tokens * d * b + rows, rows, candidate(sample_acts, d))]  # (host, device, working)
    if shape.routed_experts:  # the MoE block's group: every expert's gate/up, scaled and fake-quantized at once
        expert_f = shape.linear_groups_in[-1][0]
        gate_up = shape.linear_groups_params[-2]
        groups.append((drawn * 2 * d * b,) * 2 + (candidate(chunk * (3 * expert_f + 2 * d) * 4 + gate_up * b
                                                          + 3 * expert_f * d * 4, d),))
    else:
        groups.append((drawn * 2 * d * b,) * 2 + (candidate(chunk * (3 * f + 2 * d) * 4 + 2 * weights, d),))
        groups.append((drawn * (f + d) * b,) * 2 + (candidate(chunk * (f + 2 * d) * 4 + weights, f),))
    _, device_data, working = max(groups, key=lambda g: g[1] + g[2])  # the group of the largest device phase
    return max(g[0] for g in groups), device_data + working, working


def _one_process_peak(resident: int, cache: int, gradient_store: int, gradient_working: int, search: int,
                      solve_working: int) -> int:
    """The peak when host and device are one process (--device cpu): the stages follow each other, so the
    largest stage, not the host's peak plus the device's. The gradient pass (its stored inputs, its
    working set beyond the layer the host already holds), then per layer the scale search (its capture and
    working set) and later the solves (the working set beyond the layer), each beside the layer-input cache.
    The host's peak adds the search's capture to the cache and the device's adds the solve's buffers: on
    one process that counted the capture twice over, measured at 4 layers of the 2B shape with TLQ
    (benchmarks/results/cost/README.md, "The importance pass's heap")."""
    stages = [cache + search, cache + solve_working]
    if gradient_store:
        stages.append(gradient_store + gradient_working)
    return resident + max(stages)


def method_plan_inputs(method: str) -> dict[str, Any]:
    """What `method` (at its Recipe defaults) makes plan_memory count: `gradient_pass` (the importance pass
    weights tokens: TLQ, MBQ), `scale_search_tokens` (the scale search's token draw, None without a search)
    `scale_rescore` (the search scores candidates after its GPTQ solve: AWQ + GPTQ) and `gptq_solve` (the
    weights are solved by GPTQ, whose Gram sums and solve buffers a round-to-nearest method never holds)."""
    from tlq.recipe import BASELINE_PLANS, METHODS, Recipe

    if method not in METHODS:
        raise TlqError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    # A baseline's plan without a Recipe for it: a Recipe checks the method against its scheme (the default
    # W4A16 is refused for SmoothQuant), which the plan does not need.
    plan = BASELINE_PLANS[method] if method in BASELINE_PLANS else Recipe(method=method).plan()
    searches = plan.transform == "scale_search"
    return {"gradient_pass": plan.weighting != "uniform",
            "scale_search_tokens": Recipe().scale_max_tokens if searches else None,
            "scale_rescore": searches and plan.solver == "gptq"
            and Recipe(method=method).scale_rescore_top_resolved > 0,
            "gptq_solve": plan.solver == "gptq"}


def plan_memory(shape: ModelShape, devices: int, device_memory: int, samples: int, tokens: int,
                dtype_bytes: int = 2, asymmetric: bool = False, lazy: bool = False,
                gradient_pass: bool = True, scale_search_tokens: int | None = None,
                scale_rescore: bool = False, gptq_solve: bool = True) -> dict[str, Any]:
    """Per-rank peak memory estimate (bytes) of a `tlq quantize` run and whether it fits. `gradient_pass`:
    whether the method runs the importance pass (TLQ, MBQ); `scale_search_tokens`: the scale search's
    --scale-max-tokens when the method has one (AWQ, MBQ, TLQ), else None; `scale_rescore`: whether it scores
    candidates after GPTQ (--scale-rescore-top); `gptq_solve`: whether the weights are solved by GPTQ (not
    round to nearest: RTN, AWQ, SmoothQuant), which is what holds Gram sums and solve buffers."""
    if devices < 1 or samples < 1 or tokens < 1:
        raise TlqError("--devices, --samples and --tokens-per-sample must be >= 1")
    b, d, f, T = dtype_bytes, shape.hidden, shape.intermediate, tokens
    per_rank = math.ceil(samples / devices)
    layer = shape.layer_params * b
    # One sample through a layer: residual, normed input, q/k/v/o, MLP gate/up/act (float32 where upcast).
    sample_acts = T * (6 * d + 3 * f) * 4 + shape.heads * T * T * 4
    group_stats, solve = (_solver_bytes(shape.linear_groups_in, samples_per_chunk(samples) * T, b) if gptq_solve
                          else (0, 0))
    replaced = max(shape.linear_groups_params) * b  # a group's old weights while its solved ones are bound
    calibrate = (2 if asymmetric else 1) * layer + replaced + max(group_stats, solve) + sample_acts
    head = shape.head_params * b + 3 * T * shape.vocab * 4  # logits, log-softmax, gradient (float32)
    gradient = max(layer + 2 * sample_acts, head)
    capture = (shape.vision_params + shape.embed_params) * b + 4 * T * d * 4
    device_peak = max(calibrate, gradient, capture)
    hidden_cache = per_rank * T * d * b
    call_tables = per_rank * shape.call_kinds * 2 * T * shape.head_dim * b
    from tlq.engine import REPORT_SAMPLES

    cache = hidden_cache * (4 if asymmetric else 2) + min(per_rank, REPORT_SAMPLES) * T * d * b
    gradient_store = (shape.num_layers + 1) * hidden_cache if gradient_pass else 0
    if lazy:
        weights = (shape.total_params - shape.num_layers * shape.layer_params + 2 * shape.layer_params) * b
    else:
        weights = shape.total_params * b
    # captured on the host; a token-wise group's draw is copied to the device for the search (one copy on a CPU)
    rescale, search_device, search_working = _scale_search_bytes(shape, per_rank * T, scale_search_tokens, b,
                                                                 sample_acts, scale_rescore)
    device_peak = max(device_peak, layer + search_device)
    host_peak = weights + LOADING_OVERHEAD + call_tables + max(cache + rescale, gradient_store)
    one_process = _one_process_peak(weights + LOADING_OVERHEAD + call_tables, cache, gradient_store,
                                    max(2 * sample_acts, 3 * T * shape.vocab * 4),  # the device's, less weights
                                    rescale + search_working, calibrate - layer)
    return {
        "model": shape.name, "model_type": shape.model_type, "params_b": round(shape.total_params / 1e9, 3),
        "devices": devices, "device_memory_gib": _gib(device_memory), "samples": samples, "lazy": lazy,
        "samples_per_rank": per_rank, "tokens_per_sample": tokens, "dtype_bytes": b,
        "device_gib": {"calibrate": _gib(calibrate), "decoder_layer": _gib(layer),
                       "replaced_group_weights": _gib(replaced),
                       "hessians_largest_group": _gib(group_stats), "solve_buffers": _gib(solve),
                       "one_sample_activations": _gib(sample_acts), "gradient_pass": _gib(gradient),
                       "capture": _gib(capture), "scale_search": _gib(layer + search_device),
                       "scale_search_working": _gib(search_working), "peak": _gib(device_peak)},
        "host_gib": {"model_weights": _gib(weights), "loading_overhead": _gib(LOADING_OVERHEAD),
                     "layer_call_arguments": _gib(call_tables), "layer_input_cache": _gib(cache),
                     "gradient_pass_inputs": _gib(gradient_store), "scale_search_capture": _gib(rescale),
                     "peak": _gib(host_peak)},
        "one_process_gib": _gib(one_process),
        "fits": device_peak <= device_memory,
    }


def format_plan(plan: dict[str, Any]) -> str:
    dev, host = plan["device_gib"], plan["host_gib"]
    verdict = "fits" if plan["fits"] else "does NOT fit: add devices, use larger ones, or cut --samples/--tokens-per-sample"
    return "\n".join([
        f"{plan['model']} ({plan['model_type']}, {plan['params_b']} B params): {plan['devices']} x "
        f"{plan['device_memory_gib']} GiB, {plan['samples']} samples x {plan['tokens_per_sample']} tokens "
        f"({plan['samples_per_rank']} per rank)",
        "| per rank | GiB |", "|---|---|",
        f"| device: decoder layer | {dev['decoder_layer']} |",
        f"| device: old weights of the group being solved | {dev['replaced_group_weights']} |",
        f"| device: float64 Hessians, largest Linear group | {dev['hessians_largest_group']} |",
        f"| device: GPTQ solve buffers | {dev['solve_buffers']} |",
        f"| device: one sample's activations | {dev['one_sample_activations']} |",
        f"| device: calibration phase | {dev['calibrate']} |",
        f"| device: gradient pass (streamed) | {dev['gradient_pass']} |",
        f"| device: layer-0 capture (vision tower + embeddings) | {dev['capture']} |",
        f"| device: scale search (AWQ, MBQ, TLQ; largest group) | {dev['scale_search']} |",
        f"| **device peak** | **{dev['peak']}** |",
        f"| host: model weights ({'lazy: outside the decoder + one layer' if plan['lazy'] else 'whole model'}) | "
        f"{host['model_weights']} |",
        f"| host: checkpoint loading overhead | {host['loading_overhead']} |",
        f"| host: layers' call arguments (rotary tables) | {host['layer_call_arguments']} |",
        f"| host: layer-input cache | {host['layer_input_cache']} |",
        f"| host: gradient-pass stored inputs | {host['gradient_pass_inputs']} |",
        f"| host: scale-search capture, largest group | {host['scale_search_capture']} |",
        f"| **host peak** | **{host['peak']}** |",
        f"| one process (--device cpu): host and device together | {plan['one_process_gib']} |",
        f"verdict: {verdict}",
    ])


__all__ = ["ModelShape", "format_plan", "model_shape", "parse_size", "plan_memory"]
