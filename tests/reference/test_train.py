import torch

from tlq.data.synthetic import vocabulary
from tlq.models import adapter_for
from tlq.reference.checkpoint import build_model_and_processor
import pytest

from tlq.reference.train import (
    TRAIN_SCENES,
    ZOOMED_SCENES,
    _BatchSource,
    deepen_state,
    make_optimizer,
    size_for,
)


def test_background_batches_equal_inline_batches():
    # --data-workers 1 must change only where a batch is drawn, never which batch it is.
    _, processor = build_model_and_processor("qwen2_vl", vocabulary(), size_for("qwen2_vl", "small"))
    pad_id = processor.tokenizer.pad_token_id
    plan = [[TRAIN_SCENES, ZOOMED_SCENES], [ZOOMED_SCENES, ZOOMED_SCENES], [TRAIN_SCENES, TRAIN_SCENES]]
    drawn = {}
    for workers in (0, 1):
        source = _BatchSource("qwen2_vl", "small", processor, pad_id, workers)
        try:
            drawn[workers] = [source.next((7, step), plan[step], ((7, step + 1), plan[(step + 1) % len(plan)]))
                              for step in range(len(plan))]
        finally:
            source.close()
    for (inputs0, labels0), (inputs1, labels1) in zip(drawn[0], drawn[1]):
        assert torch.equal(labels0, labels1)
        assert inputs0.keys() == inputs1.keys()
        for key in inputs0:
            assert torch.equal(inputs0[key], inputs1[key]), key
    assert not torch.equal(drawn[0][0][1], drawn[0][2][1])  # different steps draw different batches


def test_vision_tower_gets_its_own_learning_rate_scale():
    for family in ("qwen2_vl", "llava_onevision"):
        model, _ = build_model_and_processor(family, vocabulary(), size_for(family, "small"))
        text, vision = make_optimizer(model, 1e-3, vision_lr_scale=4.0).param_groups
        assert (text["lr_scale"], vision["lr_scale"]) == (1.0, 4.0)
        # Every parameter is in exactly one group, and the vision group is the whole tower and projector.
        assert len(text["params"]) + len(vision["params"]) == len(list(model.parameters()))
        tower = model.model.visual if family == "qwen2_vl" else model.model.vision_tower
        tower_ids = {id(p) for p in tower.parameters()}
        assert tower_ids <= {id(p) for p in vision["params"]}
        assert not tower_ids & {id(p) for p in text["params"]}
        assert {id(p) for p in model.lm_head.parameters()} <= {id(p) for p in text["params"]}


def _text_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_growing_a_model_deeper_keeps_its_function_where_the_layers_write_nothing():
    # deepen_state copies each shallow layer k times and divides its residual writes by k. Where the
    # writes are zero, every copy is an identity, so the deep model must compute the shallow one exactly;
    # with them, the k copies' writes must add up to the shallow layer's.
    from dataclasses import replace

    size = size_for("qwen2_vl", "deep")
    shallow, _ = build_model_and_processor("qwen2_vl", vocabulary(), replace(size, layers=2), seed=1)
    deep, _ = build_model_and_processor("qwen2_vl", vocabulary(), size, seed=2)
    state = shallow.state_dict()
    adapter = adapter_for("qwen2_vl")
    grown = deepen_state(state, adapter, 2, 6)
    assert grown.keys() == deep.state_dict().keys()
    prefix = "model.language_model.layers"
    for j in range(6):
        query = "self_attn.q_proj.weight"
        assert torch.equal(grown[f"{prefix}.{j}.{query}"], state[f"{prefix}.{j // 3}.{query}"])
    written = sum(grown[f"{prefix}.{j}.mlp.down_proj.weight"] for j in (3, 4, 5))
    assert torch.allclose(written, state[f"{prefix}.1.mlp.down_proj.weight"])
    assert torch.equal(grown["lm_head.weight"], state["lm_head.weight"])

    for name in list(state):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = torch.zeros_like(state[name])
    shallow.load_state_dict(state)
    deep.load_state_dict(deepen_state(state, adapter, 2, 6))
    ids = torch.randint(0, 40, (2, 9))
    assert torch.equal(_text_logits(shallow.eval(), ids), _text_logits(deep.eval(), ids))


def test_growing_needs_a_divisor_of_the_depth():
    with pytest.raises(ValueError, match="divisor"):
        deepen_state({}, adapter_for("qwen2_vl"), 4, 6)
