"""The committed reference VLMs: load offline, keep their recorded accuracy, and greedy = teacher-forced."""

import json
from pathlib import Path

import pytest
import torch

from tlq.data import build_samples, load_records
from tlq.data.synthetic import SPLIT_SEEDS, write_split
from tlq.evaluate import evaluate, score_samples
from tlq.models.processing import load_processor

ROOT = Path(__file__).resolve().parents[2] / "models" / "reference"
MODELS = sorted(p.name for p in ROOT.glob("*") if (p / "config.json").is_file()) if ROOT.is_dir() else []


@pytest.fixture(scope="module")
def test_sample(tmp_path_factory):
    """The first 200 questions of the held-out test split (same seed as `tlq synth`)."""
    folder = tmp_path_factory.mktemp("test_split")
    return write_split(folder, 200, SPLIT_SEEDS["test"], name="test"), folder


def test_reference_models_are_committed():
    assert MODELS, f"no reference model under {ROOT}"


@pytest.mark.parametrize("name", MODELS)
def test_reference_models_reach_their_accuracy(name):
    recorded = json.loads((ROOT / name / "eval_test.json").read_text())
    assert recorded["accuracy"] >= 0.9, "a reference model must answer >= 90% of held-out questions"


@pytest.mark.parametrize("name", MODELS)
def test_recorded_accuracy_holds_on_200_questions(name, test_sample):
    # eval_test_200.json is the same 200 questions evaluated when the model was committed (the full
    # 1000-question figure is eval_test.json; a 200-question sample differs from it by sampling noise).
    recorded = json.loads((ROOT / name / "eval_test_200.json").read_text())
    full = json.loads((ROOT / name / "eval_test.json").read_text())
    report = evaluate(ROOT / name, *test_sample)
    assert report["num_questions"] == recorded["num_questions"] == 200
    assert abs(report["accuracy"] - recorded["accuracy"]) <= 0.03
    assert abs(report["accuracy"] - full["accuracy"]) <= 0.05


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_exact_match_equals_greedy_decoding(name, test_sample):
    from tlq.compat import load_quantized

    model = load_quantized(ROOT / name).eval()
    processor = load_processor(ROOT / name)
    records = load_records(*test_sample)[:24]
    samples = build_samples(records, processor)
    scores = score_samples(model, samples, processor.tokenizer.pad_token_id)
    for record, sample, score in zip(records, samples, scores):
        answer_start = int((sample.labels[0] != -100).nonzero()[0])
        prompt = {k: (v[:, :answer_start] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                  for k, v in sample.inputs.items()}
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        generated = out[0, answer_start:].tolist()
        target = sample.labels[0, answer_start:][sample.labels[0, answer_start:] != -100].tolist()
        assert (generated[:len(target)] == target) == bool(score["exact"]), record.meta
