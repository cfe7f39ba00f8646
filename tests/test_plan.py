"""`tlq plan` on the published configs of the supported families (tests/fixtures/configs, no weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlq.errors import TlqError
from tlq.plan import model_shape, parse_size, plan_memory

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
# Parameter counts the model cards state (billions).
PUBLISHED_PARAMS = {
    "qwen2-vl-2b-instruct": 2.21, "qwen2-vl-7b-instruct": 8.29, "qwen2-vl-72b-instruct": 73.4,
    "llava-onevision-qwen2-0.5b-ov-hf": 0.894, "llava-onevision-qwen2-7b-ov-hf": 8.03,
    "llava-onevision-qwen2-72b-ov-hf": 73.2,
}


@pytest.fixture(scope="module")
def shapes():
    return {name: model_shape(CONFIGS / name) for name in PUBLISHED_PARAMS}


def test_shapes_come_from_the_real_classes(shapes):
    for name, billions in PUBLISHED_PARAMS.items():
        assert shapes[name].total_params / 1e9 == pytest.approx(billions, rel=0.02), name
    big = shapes["qwen2-vl-72b-instruct"]
    assert big.num_layers == 80 and big.linear_groups_in == [[8192] * 3, [8192], [8192] * 2, [29568]]


def test_per_rank_activation_memory_falls_as_one_over_n(shapes):
    shape = shapes["llava-onevision-qwen2-7b-ov-hf"]
    plans = {n: plan_memory(shape, n, parse_size("24GiB"), 128, 1024) for n in (1, 2, 4, 8)}
    for n in (2, 4, 8):
        assert plans[n]["samples_per_rank"] == 128 // n
        # two full streams per rank, plus the error report's reference on at most 16 samples per rank
        per_sample = plans[1]["host_gib"]["layer_input_cache"] / (2 * 128 + 16)
        assert plans[n]["host_gib"]["layer_input_cache"] == pytest.approx(per_sample * (2 * 128 // n + 16), rel=0.02)
        assert plans[n]["device_gib"]["peak"] == plans[1]["device_gib"]["peak"]  # one layer per rank either way


def test_verdicts(shapes):
    assert plan_memory(shapes["qwen2-vl-2b-instruct"], 1, parse_size("24GiB"), 128, 1024)["fits"]
    big = plan_memory(shapes["qwen2-vl-72b-instruct"], 4, parse_size("24GiB"), 128, 1024)
    # the 29568-wide down_proj's solve dominates: float32 H and its work copy are 3.3 GiB each
    assert big["fits"] and big["device_gib"]["peak"] > 10
    assert big["device_gib"]["solve_buffers"] > 2 * 29568 ** 2 * 4 / 2**30
    assert not plan_memory(shapes["qwen2-vl-72b-instruct"], 4, parse_size("8GiB"), 128, 1024)["fits"]


def test_sizes_parse_and_bad_ones_say_how():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("80GB") == 80 * 10**9 and parse_size("16g") == 16 * 2**30
    with pytest.raises(TlqError, match="write it like"):
        parse_size("lots")


def test_lazy_plan_holds_one_layer_on_the_host(shapes):
    shape = shapes["qwen2-vl-72b-instruct"]
    eager = plan_memory(shape, 4, parse_size("24GiB"), 128, 1024)
    lazy = plan_memory(shape, 4, parse_size("24GiB"), 128, 1024, lazy=True)
    assert lazy["host_gib"]["model_weights"] < eager["host_gib"]["model_weights"] / 10  # embeddings, head, ViT + 2 layers
    assert lazy["device_gib"] == eager["device_gib"]


def test_the_gradient_pass_is_planned_only_for_the_methods_that_run_it(shapes):
    from tlq.plan import LOADING_OVERHEAD, method_plan_inputs

    shape = shapes["qwen2-vl-7b-instruct"]
    assert all(method_plan_inputs(m)["gradient_pass"] for m in ("tlq", "mbq"))
    assert not any(method_plan_inputs(m)["gradient_pass"]
                   for m in ("rtn", "gptq", "awq", "awq_gptq", "smoothquant_gptq"))
    gptq = plan_memory(shape, 1, parse_size("24GiB"), 512, 1024, gradient_pass=False)
    tlq = plan_memory(shape, 1, parse_size("24GiB"), 512, 1024, gradient_pass=True)
    host = gptq["host_gib"]
    assert host["gradient_pass_inputs"] == 0
    assert host["peak"] == pytest.approx(host["model_weights"] + LOADING_OVERHEAD / 2**30 + host["layer_input_cache"]
                                         + host["layer_call_arguments"], abs=0.02)
    assert tlq["host_gib"]["peak"] > host["peak"]  # 29 layers' stored inputs outweigh the two streams


def test_moe_plan_names_every_expert(tiny_checkpoints):
    shape = model_shape(tiny_checkpoints["qwen3_vl_moe"])
    names = [n for group in shape.linear_groups_names for n in group]
    assert "mlp.experts.7.down_proj" in names and "mlp.gate" not in names
    assert "mlp.experts.7.down_proj" in shape.row_parallel and "self_attn.o_proj" in shape.row_parallel
    assert plan_memory(shape, 1, parse_size("24GiB"), 16, 128)["fits"]
    # The MoE block's scale search holds every expert's gate/up weights fake-quantized at once.
    from tlq.plan import _scale_search_bytes

    host, device, working = _scale_search_bytes(shape, 16 * 128, 16384, 4, 0)
    assert working >= shape.linear_groups_params[-2] * 4 > 0 and device >= working


def test_the_scale_search_capture_is_planned_for_the_methods_that_search(shapes):
    """One group at a time: the larger of the attention group's two token streams (its calls and FP output
    rows) and the MLP down projection's input with the FP outputs on the token draw; nothing for GPTQ."""
    from tlq.plan import method_plan_inputs

    def draw(method):
        return method_plan_inputs(method)["scale_search_tokens"]

    assert draw("gptq") is None and draw("smoothquant") is None
    assert draw("tlq") == draw("awq") == 16384
    shape = shapes["qwen2-vl-2b-instruct"]
    gptq = plan_memory(shape, 1, parse_size("24GiB"), 128, 280, dtype_bytes=4, gradient_pass=False)
    awq = plan_memory(shape, 1, parse_size("24GiB"), 128, 280, dtype_bytes=4, gradient_pass=False,
                      scale_search_tokens=16384)
    drawn = 16384 * (shape.intermediate + shape.hidden) * 4  # 128 x 280 tokens > 16384: the draw's rows, FP outputs
    attention = 2 * 128 * 280 * shape.hidden * 4
    assert awq["host_gib"]["scale_search_capture"] == pytest.approx(max(drawn, attention) / 2**30, abs=0.01)
    assert awq["host_gib"]["peak"] - gptq["host_gib"]["peak"] == pytest.approx(max(drawn, attention) / 2**30,
                                                                              abs=0.02)
    assert gptq["device_gib"]["scale_search"] == 0.0 or gptq["device_gib"]["scale_search_working"] == 0.0


def test_the_scale_search_device_phase_grows_with_the_draw_and_the_chunk_not_the_samples(shapes):
    """The search holds one token-wise group's rows on the device: its working memory is per chunk of rows,
    so it stops growing once the draw is full, and a larger draw adds its rows. The attention group's rows
    stay on the host (one sample is moved at a time), so many samples grow the host's capture, not the
    device's search, unless the search rescores with GPTQ (its input rows go to the device for the Hessian)."""
    shape = shapes["qwen2-vl-2b-instruct"]

    def search(samples, max_tokens=16384):
        plan = plan_memory(shape, 1, parse_size("80GiB"), samples, 280, dtype_bytes=2, gradient_pass=False,
                           scale_search_tokens=max_tokens)
        return plan["device_gib"]

    # both past the draw (35840 and 71680 tokens > 16384)
    assert search(128)["scale_search_working"] == search(256)["scale_search_working"] > 0
    # the token-wise groups stop at the draw; the attention group's every token is the host's
    assert search(256)["scale_search"] == search(128)["scale_search"] == search(4096)["scale_search"]
    assert search(64, 4096)["scale_search"] < search(64, 16384)["scale_search"]
    assert search(512)["peak"] >= search(512)["scale_search"]

    def host(samples, rescore=False):
        return plan_memory(shape, 1, parse_size("80GiB"), samples, 280, dtype_bytes=2, gradient_pass=False,
                           scale_search_tokens=16384, scale_rescore=rescore)

    attention = 2 * 4096 * 280 * shape.hidden * 2 / 2**30
    assert host(4096)["host_gib"]["scale_search_capture"] == pytest.approx(attention, abs=0.01)
    rescored = host(4096, rescore=True)
    assert rescored["host_gib"]["scale_search_capture"] == pytest.approx(attention * 1.5, abs=0.01)
    assert rescored["device_gib"]["scale_search"] >= attention / 2  # the rows the Hessian is built from


def test_rescoring_after_gptq_adds_the_widest_groups_hessian_to_the_search(shapes):
    """--scale-rescore-top (AWQ + GPTQ's default): the search also holds the down projection's input Hessian
    (intermediate^2) while it builds it and solves each candidate; the other methods' plans are unchanged."""
    from tlq.plan import method_plan_inputs

    rescores = {m for m in ("awq_gptq", "tlq", "awq", "gptq", "mbq") if method_plan_inputs(m)["scale_rescore"]}
    assert rescores == {"awq_gptq"}
    shape = shapes["qwen2-vl-2b-instruct"]

    def search(rescore):
        plan = plan_memory(shape, 1, parse_size("80GiB"), 128, 280, dtype_bytes=2, gradient_pass=False,
                           scale_search_tokens=16384, scale_rescore=rescore)
        return plan["device_gib"]

    hessian = 12 * shape.intermediate ** 2 / 2**30
    assert search(False)["scale_search_working"] < hessian <= search(True)["scale_search_working"]
    # the down projection's group (data + working) becomes the largest, at least its Hessian above before
    assert search(True)["scale_search"] - search(False)["scale_search"] >= hessian - search(False)["scale_search_working"]
    # a candidate's solve and its forwards are not alive together: at these widths (the solve's 8 x f^2
    # workspace above the forwards' chunk and weights) the working memory is the Hessian and the solve
    assert search(True)["scale_search_working"] == pytest.approx(hessian, abs=0.01)


def test_gptq_buffers_are_planned_only_for_the_methods_that_solve_with_gptq(shapes):
    """AWQ, RTN and SmoothQuant round to nearest: no Gram sums or solve buffers (an AWQ run at 2B widths
    peaked at 0.74x what the plan said when it counted them: benchmarks/results/cost/2b-1l-128-awq-repeats)."""
    from tlq.plan import method_plan_inputs

    assert all(method_plan_inputs(m)["gptq_solve"] for m in ("gptq", "tlq", "awq_gptq", "smoothquant_gptq"))
    assert not any(method_plan_inputs(m)["gptq_solve"] for m in ("rtn", "awq", "smoothquant"))
    shape = shapes["qwen2-vl-2b-instruct"]
    kwargs = dict(dtype_bytes=4, gradient_pass=False, scale_search_tokens=16384)
    gptq = plan_memory(shape, 1, parse_size("24GiB"), 128, 280, **kwargs)
    rounded = plan_memory(shape, 1, parse_size("24GiB"), 128, 280, gptq_solve=False, **kwargs)
    assert rounded["device_gib"]["hessians_largest_group"] == rounded["device_gib"]["solve_buffers"] == 0
    solve = max(gptq["device_gib"]["hessians_largest_group"], gptq["device_gib"]["solve_buffers"])
    assert solve > 0.3  # the down projection's 8960-wide H and its work copy
    assert rounded["device_gib"]["calibrate"] == pytest.approx(gptq["device_gib"]["calibrate"] - solve, abs=0.002)
    assert rounded["host_gib"] == gptq["host_gib"]


def test_every_samples_rotary_tables_are_planned_on_the_host(shapes, tiny_checkpoints):
    """Each sample's layer calls carry its rotary tables (cos and sin, tokens x head width each) for the whole
    run: the host holds them beside the layer-input cache, per kind of layer call (Gemma 3: two)."""
    shape = shapes["qwen2-vl-7b-instruct"]
    assert shape.head_dim == 128 and shape.call_kinds == 1
    plans = {n: plan_memory(shape, 1, parse_size("24GiB"), n, 1024, gradient_pass=False) for n in (64, 128)}
    tables = 2 * 1024 * 128 * 2 / 2**30
    for n, plan in plans.items():
        assert plan["host_gib"]["layer_call_arguments"] == pytest.approx(n * tables, abs=0.01)
    assert plans[128]["host_gib"]["peak"] - plans[64]["host_gib"]["peak"] == pytest.approx(
        plans[128]["host_gib"]["layer_input_cache"] - plans[64]["host_gib"]["layer_input_cache"] + 64 * tables,
        abs=0.02)
    assert model_shape(tiny_checkpoints["gemma3"]).call_kinds == 2


def test_one_process_peak_is_the_largest_stage_not_host_plus_device():
    """On one CPU process the stages follow each other: the estimate is at most the host's peak plus the
    device's, at least the host's weights and input cache plus the solve's working set, and for a method
    without a scale search or gradient pass it is exactly that (GPTQ)."""
    from tlq.plan import method_plan_inputs

    shape = model_shape(CONFIGS / "qwen2-vl-2b-instruct")
    for method in ("gptq", "awq", "tlq", "awq_gptq"):
        plan = plan_memory(shape, 1, 1 << 40, 128, 280, dtype_bytes=4, **method_plan_inputs(method))
        host, device = plan["host_gib"], plan["device_gib"]
        solve_stage = (host["model_weights"] + host["loading_overhead"] + host["layer_call_arguments"]
                       + host["layer_input_cache"] + device["calibrate"] - device["decoder_layer"])
        assert solve_stage - 0.03 <= plan["one_process_gib"] <= host["peak"] + device["peak"]
        if method == "gptq":
            assert abs(plan["one_process_gib"] - solve_stage) <= 0.03
