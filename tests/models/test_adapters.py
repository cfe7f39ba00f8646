import json

import pytest
import torch
from torch import nn

from tlq.errors import TlqError
from tlq.models import ANSWER, IMAGE, PROMPT, SUPPORTED_MODEL_TYPES, VIDEO, adapter_for, load_model, read_model_type
from tlq.reference.checkpoint import FAMILIES


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TlqError) as info:
        adapter_for(read_model_type(tmp_path))
    message = str(info.value)
    assert "llama" in message and all(t in message for t in SUPPORTED_MODEL_TYPES)


def test_missing_model_dir(tmp_path):
    with pytest.raises(TlqError, match="does not exist"):
        read_model_type(tmp_path / "nope")
    with pytest.raises(TlqError, match="config.json"):
        read_model_type(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_only_decoder_linears(tiny_checkpoints, family):
    model, adapter = load_model(tiny_checkpoints[family])
    names = adapter.quantized_linear_names(model)
    text = model.config.text_config
    per_layer = 4 + (3 * text.num_experts if adapter.experts is not None else 3)  # attention + MLP (per expert)
    assert len(names) == per_layer * text.num_hidden_layers
    assert not any(name.endswith("." + kept) for name in names for kept in adapter.kept_fp)  # the router stays FP
    for name in names:
        assert isinstance(model.get_submodule(name), nn.Linear)
        assert name.startswith(adapter.decoder_layers + ".")
    for group in adapter.scaling_groups:
        layer = adapter.layers(model)[0]
        assert layer.get_submodule(group.source) is not None
        for target in group.targets:
            assert isinstance(layer.get_submodule(target), nn.Linear)
    layer = adapter.layers(model)[0]
    # Roles: the blocks partition the Linears, each block's output Linear is one of its own, and each
    # scaling group's block is a module of the layer that contains the group's targets.
    assert sorted(n for b in adapter.blocks for n in b.linears) == sorted(adapter.linear_names)
    for block in adapter.blocks:
        assert set(block.outputs) <= set(block.linears) and layer.get_submodule(block.module) is not None
    for group in adapter.scaling_groups:
        block = layer.get_submodule(group.block)
        assert all(any(m is layer.get_submodule(t) for m in block.modules()) for t in group.targets)
        assert any(m is layer.get_submodule(group.output_linear) for m in block.modules())
    vision_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and
                      ("visual" in n or "vision" in n or "projector" in n)]
    assert vision_linears and not set(vision_linears) & set(names)


def test_token_kinds(tiny_checkpoints):
    model, adapter = load_model(tiny_checkpoints["qwen2_vl"])
    image, video = adapter.image_token_id(model), adapter.video_token_id(model)
    ids = torch.tensor([5, image, image, video, 11, 12, 13])
    labels = torch.tensor([-100, -100, -100, -100, -100, 12, 13])
    assert adapter.token_kinds(model, ids, labels).tolist() == [PROMPT, IMAGE, IMAGE, VIDEO, PROMPT, ANSWER, ANSWER]
    # An image-only family has no video kind: the same token is prompt text there.
    llava, llava_adapter = load_model(tiny_checkpoints["llava_onevision"])
    assert llava_adapter.video_token_id(llava) is None


def test_no_algorithm_names_a_linear():
    """Module names live in the adapters (tlq/models/); everything else asks an adapter for roles."""
    import ast
    import re
    from pathlib import Path

    import tlq

    root = Path(tlq.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.is_relative_to(root / "models"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and re.search(r"\b(q|k|v|o|gate|up|down)_proj\b|\bself_attn\.|\bmlp\.", node.value)):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert not offenders, offenders
