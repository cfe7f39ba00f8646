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


def test_cached_reference_answers_give_the_same_kl(tiny_checkpoints, calib_split, tmp_path):
    """What `tlq bench` does: the FP model's answer log-probs, kept once, replace running it per cell."""
    from tlq.api import quantize
    from tlq.evaluate import EvalSet
    from tlq.models.processing import load_processor
    from tlq.recipe import Recipe

    path, folder = calib_split
    model = tiny_checkpoints["qwen2_vl"]
    quantized = tmp_path / "q"
    quantize(model, quantized, path, folder, Recipe(method="rtn", scheme="W2A16-g32", num_samples=2), progress=False)
    direct = evaluate(quantized, path, folder, reference=model)
    eval_set = EvalSet.load(path, folder, load_processor(model))
    fp_logp: list = []
    evaluate(model, path, folder, eval_set=eval_set, keep_logp=fp_logp)
    cached = evaluate(quantized, path, folder, reference=model, eval_set=eval_set, reference_logp=fp_logp)
    assert len(fp_logp) == direct["num_questions"]
    assert direct["answer_kl"] > 1e-4  # the two models differ, so equality below means something
    assert cached["answer_kl"] == pytest.approx(direct["answer_kl"], rel=1e-6)
    assert cached["accuracy"] == direct["accuracy"] and cached["answer_nll"] == direct["answer_nll"]
    with pytest.raises(ValueError, match="not the same data"):
        evaluate(quantized, path, folder, reference=model, eval_set=eval_set, reference_logp=fp_logp[:-1])
