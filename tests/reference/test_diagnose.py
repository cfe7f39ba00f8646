import torch

from tlq.data.synthetic import QUESTION_TYPES, vocabulary
from tlq.reference.checkpoint import build_model_and_processor
from tlq.reference.diagnose import skill_accuracy
from tlq.reference.train import size_for


def test_skill_table_scores_each_type_on_both_scene_kinds():
    model, processor = build_model_and_processor("qwen2_vl", vocabulary(), size_for("qwen2_vl", "small"))
    table = skill_accuracy(model, processor, images=4)
    assert set(table) == {"bare", "full"}
    for row in table.values():
        assert set(row) == set(QUESTION_TYPES)
        assert all(0.0 <= acc <= 1.0 for acc in row.values())
    # A model that always answers "yes" is right on about half of the exists questions and on nothing else,
    # which checks that the score reads each row's first answer token.
    answer_id = processor.tokenizer.convert_tokens_to_ids("yes")

    class AlwaysYes(torch.nn.Module):
        def forward(self, input_ids, **_):
            logits = torch.zeros(*input_ids.shape, len(processor.tokenizer))
            logits[..., answer_id] = 1.0
            return type("Out", (), {"logits": logits})()

    always_yes = skill_accuracy(AlwaysYes(), processor, images=16)
    for row in always_yes.values():
        assert 0.0 < row["exists"] < 1.0
        assert row["color"] == row["shape"] == row["count"] == row["digit"] == 0.0
