"""The peer benchmark's statistics and plumbing (benchmarks/peers/); the peers themselves run in their own venvs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tlq.recipe import parse_scheme

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"


def _module(name):
    sys.path.insert(0, str(PEERS))
    try:
        spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(PEERS))


def _answers(exact, kl):
    return {"exact": list(map(float, exact)), "kl": list(map(float, kl)), "tokens": [2] * len(exact)}


def test_added_methods_keep_the_saved_cells_only_when_the_measurement_is_the_same(tmp_path):
    run = _module("run")
    header = {"model": "m", "eval": "test.json", "questions": 2, "num_samples": 128, "seeds": [0, 1, 2]}
    saved = {**header, "cells": {"W3A16": {"tlq": {"seeds": 3}, "gptq": {"seeds": 3}}}}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    # the methods run now replace their saved cells; the others are kept
    assert run.kept_cells(dict(header), ["gptq", "awq"], tmp_path) == {"W3A16": {"tlq": {"seeds": 3}}}
    with pytest.raises(SystemExit, match="different seeds"):
        run.kept_cells({**header, "seeds": [0]}, ["awq"], tmp_path)
    assert run.kept_cells(dict(header), ["awq"], tmp_path / "nothing") == {}


def test_peer_cells_follow_each_recipe_documented_use():
    run = _module("run")
    w3, w4a8 = parse_scheme("W3A16"), parse_scheme("W4A8")
    assert run.applies("llmc:awq_gptq", w3) is None and run.applies("llmc:awq_gptq", w4a8)
    assert run.applies("llmc:smoothquant_gptq", w4a8) is None and run.applies("llmc:smoothquant_gptq", w3)
    assert run.applies("autoround", w3) is None and run.applies("autoround", w4a8)
    assert run.applies("llmc:gptq", w3) is None and run.applies("llmc:gptq", w4a8) is None


def test_peer_output_gets_transformers_5_module_names_and_processor_files(tmp_path):
    run = _module("run")
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir(), out.mkdir()
    (model / "processor_config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    (out / "config.json").write_text(json.dumps({"quantization_config": {"ignore": ["visual.blocks.0.attn.qkv", "lm_head",
                                                                                    "re:visual.*"]}}))
    run.finish_peer_output(out, str(model))
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["visual.blocks.0.attn.qkv", "lm_head", "re:visual.*", "model.visual.blocks.0.attn.qkv",
                      r"re:(.*\.)?visual\..*"]
    assert (out / "processor_config.json").exists() and (out / "tokenizer.json").exists()


def test_samples_file_holds_what_tlq_calibrates_on(tiny_checkpoints, calib_split, tmp_path):
    from safetensors import safe_open

    from tlq.data import build_samples, load_records
    from tlq.models.processing import load_processor
    from tlq.recipe import Recipe

    samples_module = _module("samples")
    checkpoint = tiny_checkpoints["qwen2_vl"]
    path = samples_module.write_samples(str(checkpoint), *map(str, calib_split), 3, 1, tmp_path / "s.safetensors")
    recipe = Recipe(num_samples=3, seed=1)
    expected = build_samples(load_records(*calib_split, 3, 1), load_processor(checkpoint), recipe.max_length)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["samples"] == "3"
        for i, sample in enumerate(expected):
            for name, value in sample.inputs.items():
                assert torch.equal(f.get_tensor(f"{i}/{name}"), value)
            assert torch.equal(f.get_tensor(f"{i}/labels"), sample.labels)
