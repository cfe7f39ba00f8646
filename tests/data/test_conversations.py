import json

import pytest

from tlq.data import build_samples, data_hash, load_records
from tlq.errors import TlqError
from tlq.models.processing import load_processor


def test_records_subset_is_deterministic(calib_split):
    path, folder = calib_split
    a = load_records(path, folder, num_samples=3, seed=5)
    b = load_records(path, folder, num_samples=3, seed=5)
    c = load_records(path, folder, num_samples=3, seed=6)
    assert [r.line for r in a] == [r.line for r in b]
    assert data_hash(a) == data_hash(b)
    assert [r.line for r in a] != [r.line for r in c] or data_hash(a) != data_hash(c)
    assert len(load_records(path, folder, num_samples=100)) == 6


def test_jsonl_and_missing_placeholder(tmp_path, calib_split):
    path, folder = calib_split
    rows = json.loads(path.read_text())
    for row in rows:
        row["conversations"][0]["value"] = row["conversations"][0]["value"].replace("<image>\n", "")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_records(jsonl, folder)
    assert records[0].messages[0]["content"][0] == {"type": "image"}


def test_labels_cover_only_assistant_turns(calib_split, tiny_checkpoints):
    path, folder = calib_split
    for family, checkpoint in tiny_checkpoints.items():
        processor = load_processor(checkpoint)
        records = load_records(path, folder, num_samples=2)
        samples = build_samples(records, processor)
        for record, sample in zip(records, samples):
            answers = [m["content"][0]["text"] for m in record.messages if m["role"] == "assistant"]
            labelled = sample.labels[0][sample.labels[0] != -100]
            words = processor.tokenizer.convert_ids_to_tokens(labelled.tolist())
            # (a newline token after the turn's end, where the tokenizer has one, belongs to the turn)
            assert [w for w in words if w != "<|im_end|>" and w.strip()] == answers, family
            assert words.count("<|im_end|>") == len(answers)


def test_max_length_never_cuts_an_image(calib_split, tiny_checkpoints):
    path, folder = calib_split
    processor = load_processor(tiny_checkpoints["qwen2_vl"])
    records = load_records(path, folder, num_samples=2)
    full = build_samples(records, processor)
    cut = build_samples(records, processor, max_length=full[0].num_tokens - 3)
    assert cut[0].num_tokens == full[0].num_tokens - 3
    assert cut[0].labels.shape[-1] == cut[0].num_tokens
    with pytest.raises(TlqError, match="max-length"):
        build_samples(records, processor, max_length=16)


@pytest.mark.parametrize("content, words", [
    ("", "is empty"),
    ("[]", "no records"),
    ("{not json", "not valid JSON"),
    ('[{"image": "nope.png", "conversations": [{"from": "human", "value": "<image>\\nq"}, '
     '{"from": "gpt", "value": "a"}]}]', "nope.png is missing"),
    ('[{"conversations": [{"from": "human", "value": "q"}]}]', "no assistant"),
    ('[{"image": "x.png", "conversations": []}]', "conversations"),
])
def test_bad_calibration_files(tmp_path, content, words):
    (tmp_path / "x.png").write_bytes(b"")
    path = tmp_path / "calib.json"
    path.write_text(content)
    with pytest.raises(TlqError, match=words):
        load_records(path, tmp_path)


def test_missing_file_and_folder(tmp_path, calib_split):
    with pytest.raises(TlqError, match="does not exist"):
        load_records(tmp_path / "none.json", tmp_path)
    with pytest.raises(TlqError, match="image folder"):
        load_records(calib_split[0], tmp_path / "no_images")
