import copy

import pytest
import torch

from tlq.api import prepare_samples
from tlq.activations import LayerInputs, LayerStreams, capture_layer_inputs, install_activation_quant, run_layer
from tlq.callbacks import InputsWatcher, LayerCallback, LoopStart
from tlq.context import RunContext
from tlq.engine import calibrate_layer, quantize_layers
from tlq.models import load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe


def _setup(checkpoint, calib_split, recipe):
    model, adapter = load_model(checkpoint)
    processor = load_processor(checkpoint)
    path, folder = calib_split
    samples = prepare_samples(model, adapter, processor, path, folder, recipe)
    return model, adapter, samples


@pytest.mark.parametrize("scheme", ["W4A16-g32", "W4A8"])
def test_next_layer_is_calibrated_on_the_quantized_layer_outputs(tiny_checkpoints, calib_split, scheme):
    recipe = Recipe(method="gptq", scheme=scheme, num_samples=4)
    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, recipe)
    seen: list[LayerInputs] = []
    quantize_layers(model, adapter, samples, recipe, progress=False,
                    callbacks=[InputsWatcher(lambda i, inputs: seen.append(copy.deepcopy(inputs)))])
    layers = adapter.layers(model)
    assert len(seen) == len(layers) == 2
    # Layer 0 after quantization (weights on their grid, activations fake-quantized for W4A8),
    # applied to its own calibration inputs, gives exactly the inputs layer 1 was calibrated on.
    layer0 = layers[0]
    hooks = install_activation_quant([layer0.get_submodule(n) for n in adapter.linear_names],
                                     recipe.resolved_scheme())
    with torch.no_grad():
        outputs = [out for _, out in run_layer(layer0, seen[0], torch.device("cpu"))]
    for h in hooks:
        h.remove()
    for produced, used in zip(outputs, seen[1].hidden):
        assert torch.equal(produced, used)
    # ...and they are not the FP path's inputs.
    fp_model, _ = load_model(tiny_checkpoints["qwen2_vl"])
    fp_inputs = capture_layer_inputs(fp_model, adapter, samples, torch.device("cpu"))
    with torch.no_grad():
        fp_out = [out for _, out in run_layer(adapter.layers(fp_model)[0], fp_inputs, torch.device("cpu"))]
    assert not torch.equal(fp_out[0], seen[1].hidden[0])


class _Recording(LayerCallback):
    """Records the hooks' order; resumes at layer `skip` on the given streams' values (a stand-in store)."""

    def __init__(self, skip: int = 0) -> None:
        self.events, self.skip = [], skip

    def resume(self, start, layers, result):
        self.events.append(("resume", start.first))
        return LoopStart(self.skip, start.streams) if self.skip else start

    def layer_starting(self, index, streams):
        self.events.append(("start", index, id(streams)))

    def layer_finished(self, finished):
        assert finished.report.index == finished.index and next(finished.layer.parameters()).device.type == "cpu"
        self.events.append(("finish", finished.index, id(finished.streams)))


def test_callbacks_hear_every_layer_in_order_and_can_move_the_start(tiny_checkpoints, calib_split):
    recipe = Recipe(method="rtn", scheme="W4A16-g32", num_samples=2)
    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, recipe)
    heard = _Recording()
    result = quantize_layers(model, adapter, samples, recipe, progress=False, callbacks=[heard])
    kinds = [(e[0],) + e[1:2] for e in heard.events]
    assert kinds == [("resume", 0), ("start", 0), ("finish", 0), ("start", 1), ("finish", 1)]
    assert heard.events[2][2] == heard.events[3][2]  # layer 1 starts on the streams layer 0 finished with
    assert len(result.quantized) == 2 * len(adapter.linear_names)  # resident layers keep their grids
    # A callback that resumes at layer 1: layer 0 is neither calibrated nor reported by the loop.
    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, recipe)
    before = adapter.layers(model)[0].self_attn.q_proj.weight.clone()
    skipping = _Recording(skip=1)
    result = quantize_layers(model, adapter, samples, recipe, progress=False, callbacks=[skipping])
    assert [e[:2] for e in skipping.events] == [("resume", 0), ("start", 1), ("finish", 1)]
    assert [r.index for r in result.layers] == [1]
    assert torch.equal(adapter.layers(model)[0].self_attn.q_proj.weight, before)


class _FirstInputsWatch(LayerCallback):
    """Holds weak references to the first layer's inputs and notes, as layer 1 starts, how many are alive."""

    def resume(self, start, layers, result):
        import weakref

        self.first = [weakref.ref(h) for h in start.streams.quantized.hidden]
        return start

    def layer_starting(self, index, streams):
        if index == 1:
            self.alive_at_layer_1 = sum(ref() is not None for ref in self.first)


def test_the_loop_lets_go_of_each_layers_inputs_once_the_next_layer_starts(tiny_checkpoints, calib_split):
    """Only the current layer's inputs stay alive: the first layer's are freed once layer 1 starts (they were
    held through the whole loop once, one s x T x d cache of memory)."""
    recipe = Recipe(method="rtn", scheme="W4A16-g32", num_samples=2)
    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, recipe)
    watch = _FirstInputsWatch()
    quantize_layers(model, adapter, samples, recipe, progress=False, callbacks=[watch])
    assert len(watch.first) == 2 and watch.alive_at_layer_1 == 0


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("scheme", ["W3A16-g32", "W4A8"])
def test_gptq_has_lower_layer_error_than_rtn_on_the_same_inputs(tiny_checkpoints, calib_split, family, scheme):
    recipe = Recipe(method="gptq", scheme=scheme, num_samples=6)
    model, adapter, samples = _setup(tiny_checkpoints[family], calib_split, recipe)
    inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
    device = torch.device("cpu")
    for index, layer in enumerate(adapter.layers(model)):
        errors = {}
        for method in ("rtn", "gptq"):
            r = Recipe(method=method, scheme=scheme, num_samples=6)
            _, _, _, report = calibrate_layer(copy.deepcopy(layer), index, LayerStreams(inputs), RunContext.of(r, adapter, device))
            errors[method] = report.relative_error
        assert errors["gptq"] < errors["rtn"], (index, errors)
        with torch.no_grad():
            inputs = LayerInputs([out.cpu() for _, out in run_layer(layer, inputs, device)], inputs.kwargs)


def test_token_weights_reach_the_solver(tiny_checkpoints, calib_split):
    recipe = Recipe(method="gptq", scheme="W4A16-g32", num_samples=3)
    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, recipe)
    calls = []

    def weights(layer, name, sample):
        calls.append((layer, name, sample))
        return torch.ones(samples[sample].num_tokens)

    quantize_layers(model, adapter, samples, recipe, token_weights=weights, progress=False)
    assert {c[2] for c in calls} == {0, 1, 2}
    assert {c[1] for c in calls} == set(adapter.linear_names)
    assert {c[0] for c in calls} == {0, 1}


@pytest.mark.parametrize(("method", "scheme", "target"), [
    ("rtn", "W4A8", "symmetric"), ("gptq", "W3A16-g32", "symmetric"), ("awq", "W3A16-g32", "symmetric"),
    ("smoothquant", "W8A8", "symmetric"), ("mbq", "W4A8", "symmetric"), ("tlq", "W4A8", "asymmetric"),
    ("awq_gptq", "W3A16-g32", "asymmetric"), ("smoothquant_gptq", "W4A8", "symmetric")])
def test_fp_values_survive_where_they_are_read_and_weights_are_written_in_place(
        tiny_checkpoints, calib_split, method, scheme, target, monkeypatch):
    """Calibration writes into the layer's own tensors (one copy of the layer in memory), except that an FP
    view (engine.fp_view, the asymmetric target) must keep its values: solved weights are then bound as new
    tensors. The FP stream is the FP layer's output either way."""
    from tlq import engine
    from tlq.api import build_token_weights

    recipe = Recipe(method=method, scheme=scheme, num_samples=4, target=target)
    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, recipe)
    weights, _ = build_token_weights(model, adapter, samples, recipe)
    device = torch.device("cpu")
    inputs = capture_layer_inputs(model, adapter, samples, device)
    layer = adapter.layers(model)[0]
    snapshot = {name: t.clone() for name, t in layer.state_dict().items()}
    originals = {name: t for name, t in layer.state_dict().items()}
    views, make_view = [], engine.fp_view

    def recording_view(module):
        view = make_view(module)
        views.append((view, {n: t.clone() for n, t in view.state_dict().items()}))
        return view

    monkeypatch.setattr(engine, "fp_view", recording_view)
    fp_inputs = LayerInputs([h + 0.01 for h in inputs.hidden], inputs.kwargs)  # a distinct FP-path stream
    _, _, fp_outputs, _ = calibrate_layer(layer, 0, LayerStreams(inputs, fp_inputs),
                                          RunContext.of(recipe, adapter, device, token_weights=weights))
    assert any(not torch.equal(t, snapshot[n]) for n, t in layer.state_dict().items())  # the layer did change
    assert len(views) == (target == "asymmetric")
    for view, values in views:  # the FP view kept its values through the solves
        assert all(torch.equal(t, values[n]) for n, t in view.state_dict().items())
    if target == "symmetric":  # no view: every Linear's weight is still the tensor it was, holding Q(W)
        for name in adapter.linear_names:
            assert layer.get_submodule(name).weight.data_ptr() == originals[f"{name}.weight"].data_ptr(), name
    reference = copy.deepcopy(layer)
    reference.load_state_dict(snapshot)
    with torch.no_grad():
        expected = [out for _, out in run_layer(reference, fp_inputs, device)]
    for got, want in zip(fp_outputs.hidden, expected):
        assert torch.equal(got, want)


def test_chunked_observation_gives_the_per_sample_hessian():
    """The observer hands `chunk` samples to the solver at once (the last chunk may be short); the
    Hessian and token count match handing them over one by one, token weights included."""
    from types import SimpleNamespace

    from tlq.observe import Observer as _Observer
    from tlq.quant.gptq import GPTQ

    recipe = Recipe(scheme="W4A16-g32")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 5 + i, 64, generator=g) for i in range(7)]
    weights = [torch.rand(5 + i, generator=g) for i in range(7)]
    hessians = []
    for chunk in (1, 3):
        solver = GPTQ(torch.randn(16, 64, generator=g), recipe.resolved_scheme(), recipe.resolve().gptq)
        run = SimpleNamespace(index=0, token_weights=lambda layer, name, sample: weights[sample], chunk=chunk)
        observer = _Observer(solver, run, "q_proj", None, None)
        for i, x in enumerate(xs):
            observer.sample = i
            observer(None, (x,))
        observer.flush()
        hessians.append((solver.hessian(), float(solver.num_tokens)))
    assert hessians[0][1] == hessians[1][1] == sum(x.shape[1] for x in xs)
    assert torch.allclose(hessians[0][0], hessians[1][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["W4A16-g32", "W4A8"])
def test_gptq_runs_the_whole_layer_twice_per_sample(tiny_checkpoints, calib_split, scheme):
    """Plain GPTQ: the FP reference pass also observes the first Linear group, and each later group's
    pass stops at its last Linear, so the layer's last Linear runs once for the reference and once to
    propagate; the weights are the same as with every pass run to the end (the golden digests)."""
    recipe = Recipe(method="gptq", scheme=scheme, num_samples=4)
    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, recipe)
    inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
    layer = adapter.layers(model)[0]
    calls = []
    last = layer.get_submodule(adapter.linear_groups[-1][-1])
    handle = last.register_forward_hook(lambda module, args, output: calls.append(1))
    calibrate_layer(layer, 0, LayerStreams(inputs), RunContext.of(recipe, adapter))
    handle.remove()
    assert len(calls) == 2 * len(samples)


def _calibrate_keeping(kept: int, recipe, checkpoint, calib_split, monkeypatch):
    """Layer 0 calibrated with `kept` FP references run to the end: (weights, next-layer inputs, calls of
    the layer's first and last Linears)."""
    import tlq.engine

    model, adapter, samples = _setup(checkpoint, calib_split, recipe)
    inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
    monkeypatch.setattr(tlq.engine, "REPORT_SAMPLES", kept)
    layer = adapter.layers(model)[0]
    calls = {"first": 0, "last": 0}

    def counter(which):
        def count(module, args, output):
            calls[which] += 1
        return count

    handles = [layer.get_submodule(adapter.linear_groups[0][0]).register_forward_hook(counter("first")),
               layer.get_submodule(adapter.linear_groups[-1][-1]).register_forward_hook(counter("last"))]
    quantized, outputs, _, _ = calibrate_layer(layer, 0, LayerStreams(inputs), RunContext.of(recipe, adapter))
    for handle in handles:
        handle.remove()
    return quantized, outputs.hidden, calls


def _assert_same_results(few, every) -> None:
    (few_weights, few_out, _), (every_weights, every_out, _) = few, every
    assert few_weights.keys() == every_weights.keys()
    assert all(torch.equal(few_weights[name].weight, every_weights[name].weight) for name in few_weights)
    assert all(torch.equal(a, b) for a, b in zip(few_out, every_out))


@pytest.mark.parametrize("scheme", ["W4A16-g32", "W4A8"])
def test_the_reference_pass_runs_to_the_end_only_for_the_samples_it_keeps(tiny_checkpoints, calib_split,
                                                                          scheme, monkeypatch):
    """Past the error report's samples, the FP reference pass stops at the first group's Linears: the
    layer's last Linear runs kept + N times, and the weights and next-layer inputs are exactly those of a
    run that takes every sample's reference to the end."""
    recipe = Recipe(method="gptq", scheme=scheme, num_samples=4)
    results = {kept: _calibrate_keeping(kept, recipe, tiny_checkpoints["qwen2_vl"], calib_split, monkeypatch)
               for kept in (1, 4)}
    for kept, (_, hidden, calls) in results.items():
        assert calls["last"] == kept + len(hidden)
    _assert_same_results(results[1], results[4])


def test_a_scaled_method_runs_the_reference_only_for_the_samples_it_keeps(tiny_checkpoints, calib_split,
                                                                           monkeypatch):
    """AWQ's reference pass observes nothing, so samples past the error report's never enter it: keeping one
    reference instead of all saves N-1 calls of the layer's first and last Linears, and the weights and
    next-layer inputs are exactly those of a run that keeps every reference."""
    recipe = Recipe(method="awq", scheme="W4A16-g32", num_samples=4)
    few, every = (_calibrate_keeping(kept, recipe, tiny_checkpoints["qwen2_vl"], calib_split, monkeypatch)
                  for kept in (1, 4))
    skipped = len(every[1]) - 1
    assert every[2]["first"] - few[2]["first"] == skipped
    assert every[2]["last"] - few[2]["last"] == skipped
    _assert_same_results(few, every)


@pytest.mark.parametrize(("method", "scheme", "target"), [
    ("gptq", "W4A16-g32", "symmetric"), ("gptq", "W4A8", "symmetric"), ("tlq", "W3A16-g32", "asymmetric")])
def test_a_solved_attention_is_replayed_not_recomputed(tiny_checkpoints, calib_split, method, scheme, target,
                                                       monkeypatch):
    """Once q, k and v are solved, the pass observing o records o's inputs, and the pass observing gate/up
    computes the attention as o applied to them (running it in full for its first sample only, to check);
    once o is solved too, that pass records the attention's output and the two passes after it (down_proj
    observed, the layer propagated) replay it. So the layer's first Linear runs 3N - 1 fewer times, its
    last as often, and the weights and next-layer inputs are exactly those of a run that recomputes the
    attention on every pass."""
    from tlq.api import build_token_weights
    from tlq.replay import BlockReplay

    recipe = Recipe(method=method, scheme=scheme, num_samples=4, target=target)

    def calibrate():
        model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, recipe)
        weights, _ = build_token_weights(model, adapter, samples, recipe)
        inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
        layer = adapter.layers(model)[0]
        calls = {"first": 0, "last": 0}
        handles = [layer.get_submodule(name).register_forward_hook(
            lambda module, args, output, which=which: calls.__setitem__(which, calls[which] + 1))
            for which, name in (("first", adapter.linear_groups[0][0]), ("last", adapter.linear_groups[-1][-1]))]
        fp = LayerInputs([h + 0.01 for h in inputs.hidden], inputs.kwargs) if target == "asymmetric" else None
        quantized, outputs, _, _ = calibrate_layer(layer, 0, LayerStreams(inputs, fp),
                                                   RunContext.of(recipe, adapter, token_weights=weights))
        for handle in handles:
            handle.remove()
        return quantized, outputs.hidden, calls, len(samples)

    replayed = calibrate()
    monkeypatch.setattr(BlockReplay, "handles", lambda self, device, record=True: [])
    recomputed = calibrate()
    samples = replayed[3]
    assert recomputed[2]["first"] - replayed[2]["first"] == 3 * samples - 1
    assert recomputed[2]["last"] == replayed[2]["last"]
    _assert_same_results(replayed[:3], recomputed[:3])
