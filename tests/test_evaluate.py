import json

import pytest

from tlq.evaluate import _answer_spans, evaluate

import torch


def test_answer_spans():
    labels = torch.tensor([-100, 5, 6, -100, -100, 7, -100, 8])
    assert _answer_spans(labels) == [(1, 3), (5, 6), (7, 8)]


def test_eval_against_itself(tiny_checkpoints, calib_split, tmp_path):
    path, folder = calib_split
    out = tmp_path / "eval.json"
    report = evaluate(tiny_checkpoints["qwen2_vl"], path, folder, reference=tiny_checkpoints["qwen2_vl"],
                      out=out)
    assert report["num_questions"] == 18  # 6 records x 3 questions
    assert abs(report["answer_kl"]) < 1e-6
    assert report["answer_nll"] > 0
    assert sum(v["n"] for v in report["per_type"].values()) == 18
    assert json.loads(out.read_text())["accuracy"] == report["accuracy"]


def test_eval_rejects_unsupported(tmp_path, calib_split):
    from tlq.errors import TlqError

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(TlqError, match="unsupported"):
        evaluate(tmp_path, *calib_split)
