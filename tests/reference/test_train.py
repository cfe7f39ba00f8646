import torch

from tlq.data.synthetic import vocabulary
from tlq.reference.checkpoint import build_model_and_processor
from tlq.reference.train import TRAIN_SCENES, ZOOMED_SCENES, _BatchSource, make_optimizer, size_for


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
