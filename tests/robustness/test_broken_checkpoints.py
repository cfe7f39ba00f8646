"""Classes 2, 4 and 5: a broken, incomplete or unsafe checkpoint is refused with one line by every
command that reads it (eager and --lazy quantize, eval, importance), before any output appears, and
never quantized into an output that holds randomly initialised weights."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def _rewrite(model, change):
    tensors = load_file(str(model / WEIGHTS))
    change(tensors)
    save_file(tensors, str(model / WEIGHTS), metadata={"format": "pt"})


def _key(model, part):
    return next(k for k in load_file(str(model / WEIGHTS)) if part in k)


def _raw_header(model):
    data = (model / WEIGHTS).read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return data, length, json.loads(data[8:8 + length])


def _with_header(model, edit):
    data, length, header = _raw_header(model)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (model / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def _config(model, edit):
    path = model / "config.json"
    config = json.loads(path.read_text())
    result = edit(config)
    path.write_text(json.dumps(config if result is None else result))


def _set_value(part, value):
    def change(model):
        key = _key(model, part)
        _rewrite(model, lambda t: t[key].view(-1).__setitem__(0, value))
    return change


def _first_tensor_offsets(header):
    name = next(k for k in header if k != "__metadata__")
    return header[name]


def _truncate(model):
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(data[: len(data) // 2])


def _only_pickle(model):
    torch_bytes = b"\x80\x02not really a pickle"
    (model / WEIGHTS).unlink()
    (model / "pytorch_model.bin").write_bytes(torch_bytes)


def _index_missing_shard(model):
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    (model / WEIGHTS).rename(model / "model-00001-of-00002.safetensors")


def _index_escapes(model):
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    (model / WEIGHTS).unlink()


def _index_garbage(model):
    (model / "model.safetensors.index.json").write_text("{not json")
    (model / WEIGHTS).unlink()


def _nested(depth):
    return "[" * depth + "]" * depth


def _five_layers(config):
    config["text_config"]["num_hidden_layers"] = 5
    config["text_config"].pop("layer_types", None)


def _five_layers_with_types(config):
    config["text_config"]["num_hidden_layers"] = 5


def _remove(*names):
    def change(model):
        for name in names:
            (model / name).unlink()
    return change


def _break_template(model):
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %")


def _no_template(model):
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))


# name -> (how to break the checkpoint, words of the refusal, which readers see the problem)
# readers: q = quantize, l = quantize --lazy, e = eval, i = importance
CASES = {
    "weights truncated": (_truncate, "truncated", "qlei"),
    "weights empty": (lambda m: (m / WEIGHTS).write_bytes(b""), "is corrupt", "qlei"),
    "weights random bytes": (lambda m: (m / WEIGHTS).write_bytes(os.urandom(4096)), "is corrupt", "qlei"),
    "header length beyond the file": (lambda m: (m / WEIGHTS).write_bytes(struct.pack("<Q", 10**9) + b"{}"),
                                      "is corrupt", "qlei"),
    "header not JSON": (lambda m: (m / WEIGHTS).write_bytes(struct.pack("<Q", 8) + b"notjson!" + b"\0" * 64),
                        "is corrupt", "qlei"),
    "header a JSON list": (lambda m: (m / WEIGHTS).write_bytes(struct.pack("<Q", 8) + b"[1,2,3] "), "is corrupt", "qlei"),
    "header offsets past the end": (lambda m: _with_header(m, lambda h: _first_tensor_offsets(h).__setitem__(
        "data_offsets", [0, 10**9])), "outside the file", "qlei"),
    "header size disagrees with shape": (lambda m: _with_header(m, lambda h: _first_tensor_offsets(h).__setitem__(
        "shape", [3, 7, 11])), "bytes for shape", "qlei"),
    "header unknown dtype": (lambda m: _with_header(m, lambda h: _first_tensor_offsets(h).__setitem__(
        "dtype", "Q9")), "unknown dtype", "qlei"),
    "missing decoder tensor": (lambda m: _rewrite(m, lambda t: t.pop(_key(m, "layers.0.mlp.down_proj"))), "lack",
                               "qlei"),
    "missing vision tensor": (lambda m: _rewrite(m, lambda t: t.pop(_key(m, "visual.blocks.0.attn.proj.bias"))),
                              "lack", "qlei"),
    "missing embedding": (lambda m: _rewrite(m, lambda t: t.pop(_key(m, "embed_tokens"))), "lack", "qlei"),
    "unexpected tensor": (lambda m: _rewrite(m, lambda t: t.__setitem__("model.extra.weight", torch.zeros(3))),
                          "no place for", "qlei"),
    "wrong-shaped decoder tensor": (lambda m: _rewrite(m, lambda t: t.__setitem__(
        _key(m, "layers.0.mlp.down_proj"), torch.zeros(3, 3))), "shape", "qlei"),
    "wrong-shaped vision tensor": (lambda m: _rewrite(m, lambda t: t.__setitem__(
        _key(m, "visual.merger.mlp.0.weight"), torch.zeros(3, 3))), "shape", "qlei"),
    "config says 5 layers over 2 stored": (lambda m: _config(m, _five_layers), "layers.2", "qlei"),
    "config layer count disagrees with layer_types": (lambda m: _config(m, _five_layers_with_types), "layer_types",
                                                      "qlei"),
    "NaN in a decoder weight": (_set_value("layers.1.self_attn.q_proj.weight", math.nan), "NaN or inf", "qlei"),
    "inf in a decoder weight": (_set_value("layers.0.mlp.up_proj.weight", math.inf), "NaN or inf", "qlei"),
    "NaN in a vision weight": (_set_value("visual.blocks.0.mlp", math.nan), "NaN or inf", "qlei"),
    "3e38 in a decoder weight": (_set_value("layers.0.mlp.down_proj.weight", 3e38), "beyond float16", "qlei"),
    "1e6 in a vision weight": (_set_value("visual.blocks.0.attn.qkv.weight", 1e6), "beyond float16", "qlei"),
    "only pytorch_model.bin": (_only_pickle, "pickle", "qlei"),
    "no weights at all": (_remove(WEIGHTS), "has no weights", "qlei"),
    "index names a missing shard": (_index_missing_shard, "missing", "qlei"),
    "index names a shard outside the folder": (_index_escapes, "outside the checkpoint folder", "qlei"),
    "index is not JSON": (_index_garbage, "cannot read", "qlei"),
    "config.json is a JSON list": (lambda m: (m / "config.json").write_text("[1, 2]"), "not an object", "qlei"),
    "config.json is not JSON": (lambda m: (m / "config.json").write_text("{model_type: qwen2_vl"), "cannot read",
                                "qlei"),
    "config.json nested too deeply": (lambda m: (m / "config.json").write_text(_nested(100000)), "nested too deeply",
                                      "qlei"),
    "config.json is not UTF-8": (lambda m: (m / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "cannot read",
                                 "qlei"),
    "config.json missing": (_remove("config.json"), "no config.json", "qlei"),
    "config.json without model_type": (lambda m: _config(m, lambda c: c.pop("model_type") and None), "unsupported",
                                       "qlei"),
    "config.json model_type is a number": (lambda m: _config(m, lambda c: c.__setitem__("model_type", 5)),
                                           "not a name", "qlei"),
    "unsupported architecture": (lambda m: _config(m, lambda c: c.__setitem__("model_type", "llama")),
                                 "tlq supports", "qlei"),
    "no tokenizer": (_remove("tokenizer.json", "tokenizer_config.json"), "tokenizer", "qlei"),
    "no chat template": (_no_template, "chat template", "qlei"),
    "broken chat template": (_break_template, "chat template", "qlei"),
    "no processor config": (_remove("processor_config.json"), "processor", "qlei"),
    "processor config garbage": (lambda m: (m / "processor_config.json").write_text("[[["), "processor", "qlei"),
}


def _argv(reader, workspace):
    w = workspace
    if reader in "ql":
        return w.quantize_argv(*(["--lazy"] if reader == "l" else []))
    if reader == "e":
        return ["eval", w.model, "--data", w.calib, "--images", w.data, "--num-samples", "2"]
    return ["importance", w.model, "--calib", w.calib, "--images", w.data, "--num-samples", "2", "--out",
            w.root / "imp.safetensors"]


PARAMS = [pytest.param(case, reader, id=f"{case}-{reader}") for case, (_, _, readers) in sorted(CASES.items())
          for reader in readers]


@pytest.mark.parametrize(("case", "reader"), PARAMS)
def test_a_broken_checkpoint_is_refused_with_one_line(case, reader, workspace, refused_cleanly):
    breaker, words, _ = CASES[case]
    breaker(workspace.model)
    refused_cleanly(_argv(reader, workspace), words)


def test_the_model_folder_is_a_file(workspace, refused_cleanly):
    refused_cleanly(workspace.quantize_argv(model=workspace.unrelated), "does not exist")


def test_pickle_weights_are_never_opened(workspace, refused_cleanly, monkeypatch):
    """A checkpoint with only pytorch_model.bin is refused before anything unpickles it."""
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load / pickle must never run on user files")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    _only_pickle(workspace.model)
    refused_cleanly(workspace.quantize_argv(), "pickle")
