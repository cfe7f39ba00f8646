"""Outputs that serve: no loader can quantize a vision tower or projector, the defaults load in plain
transformers with tlq not imported, and where a scheme runs (and at which tensor-parallel sizes) is
said before calibrating."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tlq.api import quantize
from tlq.errors import TlqError
from tlq.models import adapter_for, load_model, read_model_type
from tlq.models.lazy import CheckpointTensors
from tlq.recipe import Recipe, parse_scheme
from tlq.serving import check_tp, largest_tp, linear_in_features, where_it_runs

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "llava_next", "idefics3", "smolvlm", "mistral3",
            "internvl", "gemma3")

# vLLM 0.32's names for what it loads, replayed (vllm/model_executor/models/{qwen2_vl,qwen2_5_vl,qwen3_vl,
# llava_onevision,siglip,...}.py: hf_to_vllm_mapper prefixes and packed_modules_mapping), and its ignore
# matching (compressed_tensors/utils.py should_ignore_layer, quantization/utils/config_utils.py).
VLLM_PREFIXES = {
    "qwen2_vl": {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                 "lm_head.": "language_model.lm_head.", "model.": "language_model.model."},
    "llava_onevision": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                        "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."},
}
VLLM_PREFIXES["qwen2_5_vl"] = VLLM_PREFIXES["qwen2_vl"]
VLLM_PREFIXES["qwen3_vl"] = {"model.visual.": "visual.", "lm_head.": "language_model.lm_head.",  # qwen3_vl.py
                             "model.language_model.": "language_model.model."}
VLLM_PREFIXES["qwen3_vl_moe"] = VLLM_PREFIXES["qwen3_vl"]  # qwen3_vl_moe.py subclasses qwen3_vl.py's model
# llava_next.py, gemma3_mm.py, interns1.py (vLLM's class for InternVLForConditionalGeneration), mistral3.py;
# idefics3.py and smolvlm.py load the checkpoint's own names.
_LLAVA_STYLE = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}
VLLM_PREFIXES["llava_next"] = {**_LLAVA_STYLE, "model.image_newline": "image_newline"}
VLLM_PREFIXES["gemma3"] = VLLM_PREFIXES["internvl"] = _LLAVA_STYLE
VLLM_PREFIXES["mistral3"] = {**_LLAVA_STYLE, "model.": "language_model.model."}
VLLM_PREFIXES["idefics3"] = VLLM_PREFIXES["smolvlm"] = {}
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
FUSED_BY_PART = {part: fused for fused, parts in FUSED.items() for part in parts}


def vllm_name(family: str, checkpoint_name: str) -> str:
    for prefix, new in VLLM_PREFIXES[family].items():  # every matching prefix, in order, as vLLM does
        if checkpoint_name.startswith(prefix):
            checkpoint_name = new + checkpoint_name[len(prefix):]
    head, _, last = checkpoint_name.rpartition(".")
    return f"{head}.{FUSED_BY_PART.get(last, last)}" if last in FUSED_BY_PART else checkpoint_name


def vllm_ignore_list(family: str, ignore: list[str]) -> list[str]:
    """CompressedTensorsConfig.apply_vllm_mapper: layer paths are mapped, `re:` entries kept."""
    return [vllm_name_prefix_only(family, t) if "." in t and not t.startswith("re:") else t for t in ignore]


def vllm_name_prefix_only(family: str, name: str) -> str:
    for prefix, new in VLLM_PREFIXES[family].items():
        if name.startswith(prefix):
            name = new + name[len(prefix):]
    return name


def _matches(value: str, target: str) -> bool:
    return bool(re.match(target[3:], value)) if target.startswith("re:") else value == target


def vllm_ignores(layer: str, ignore: list[str]) -> bool:
    """should_ignore_layer: a direct match, else every shard of a fused layer must match (or none)."""
    if any(_matches(layer, t) for t in ignore):
        return True
    last = layer.rsplit(".", 1)[-1]
    if last not in FUSED:
        return False
    shards = [any(_matches(layer.replace(last, part), t) for t in ignore) for part in FUSED[last]]
    assert all(shards) or not any(shards), f"vLLM refuses {layer}: shards ignored inconsistently"
    return all(shards)


@pytest.fixture(scope="module")
def outputs(tiny_checkpoints, calib_split, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return {family: quantize(tiny_checkpoints[family], root / family, *calib_split,
                             Recipe(method="rtn", scheme="W4A16-g32", num_samples=2), progress=False).out_dir
            for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_never_quantizes_a_vision_tower_or_projector(family, tiny_checkpoints, outputs):
    """Every Linear outside the decoder, named as vLLM names it (q/k/v fused), is ignored; no decoder
    Linear is. The stored name of each module is found by its bytes, not by tlq's own name matching."""
    ignore = vllm_ignore_list(family, json.loads((outputs[family] / "config.json").read_text())
                              ["quantization_config"]["ignore"])
    model, adapter = load_model(tiny_checkpoints[family])
    stored = load_file(str(tiny_checkpoints[family] / "model.safetensors"))
    decoder = adapter.decoder_layers + "."
    outside = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(decoder)]
    assert outside
    for name, module in outside:
        keys = [k for k, v in stored.items() if v.shape == module.weight.shape and torch.equal(v, module.weight)]
        if not keys:  # a head tied to the embeddings is not stored; vLLM does not quantize lm_head
            continue
        layer = vllm_name(family, keys[0][: -len(".weight")])
        assert vllm_ignores(layer, ignore), (name, layer)
    prefix = CheckpointTensors(outputs[family]).layer_prefix()
    for index in range(len(adapter.layers(model))):
        for linear in adapter.linear_names:
            layer = vllm_name(family, f"{prefix}{index}.{linear}")
            assert not vllm_ignores(layer, ignore), layer
        for kept in adapter.kept_fp:  # an MoE router: vLLM builds a Linear (GateLinear) that must stay FP
            assert vllm_ignores(vllm_name(family, f"{prefix}{index}.{kept}"), ignore), kept


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_keep_the_source_checkpoint_names(family, tiny_checkpoints, outputs):
    source, written = CheckpointTensors(tiny_checkpoints[family]), CheckpointTensors(outputs[family])
    prefix = source.layer_prefix()
    assert written.layer_prefix() == prefix
    outside = sorted(k for k in source.keys() if not k.startswith(prefix))
    assert outside == sorted(k for k in written.keys() if not k.startswith(prefix))
    for key in outside:
        assert torch.equal(source.get(key), written.get(key)), key


_PLAIN = """
import sys, json, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
inputs = load_file(sys.argv[2])
with torch.no_grad():
    logits = model(**inputs).logits
save_file({"logits": logits.contiguous()}, sys.argv[3])
print(json.dumps(sorted(m for m in sys.modules if m == "tlq" or m.startswith("tlq."))))
"""


_PLAIN_ENV = {"PYTHONPATH": "", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

DENSE_FAMILIES = tuple(f for f in FAMILIES if f != "qwen3_vl_moe")


@pytest.mark.parametrize("family", DENSE_FAMILIES)
@pytest.mark.parametrize("scheme", [None, "W8A8", "W4A8"])  # None: what `tlq quantize` writes by default
def test_default_outputs_load_in_plain_transformers(family, scheme, tiny_checkpoints, calib_split, tmp_path):
    """AutoModelForImageTextToText.from_pretrained in a fresh interpreter that never imports tlq gives
    the logits tlq's own loader gives."""
    from tlq.api import prepare_samples
    from tlq.models.processing import load_processor

    recipe = Recipe(method="gptq", num_samples=2) if scheme is None else Recipe(scheme=scheme, num_samples=2)
    recipe = Recipe(**{**recipe.to_dict(), "group_size": 32 if scheme is None else None})
    out = quantize(tiny_checkpoints[family], tmp_path / "out", *calib_split, recipe, progress=False).out_dir
    model, adapter = load_model(tiny_checkpoints[family])
    sample = prepare_samples(model, adapter, load_processor(out), *calib_split, Recipe(num_samples=1))[0]
    _assert_plain_logits_are_ours(_run_plain(_PLAIN, out, sample, tmp_path), out, sample, tmp_path)


def _run_plain(code: str, out, sample, tmp_path) -> subprocess.CompletedProcess:
    """`code` (reads the checkpoint, the inputs and where to write logits from argv) in a fresh interpreter
    with tlq off the path, on `sample`'s inputs."""
    save_file({k: v.contiguous() for k, v in sample.inputs.items()}, str(tmp_path / "inputs.safetensors"))
    return subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "logits.safetensors")], capture_output=True, text=True, env=_PLAIN_ENV,
                          timeout=300)


def _assert_plain_logits_are_ours(proc, out, sample, tmp_path) -> None:
    from tlq.compat import load_quantized

    assert proc.returncode == 0, proc.stderr[-1500:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # tlq never imported
    plain = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    with torch.no_grad():
        ours = load_quantized(out).eval()(**sample.inputs).logits
    assert torch.allclose(plain, ours, rtol=0, atol=1e-5)


def _quantized_moe(tiny_checkpoints, calib_split, out, scheme):
    weight_only = parse_scheme(scheme.removesuffix("-asym")).quantizes_activations is False
    recipe = Recipe(method="rtn", scheme=scheme.removesuffix("-asym"), num_samples=2,
                    group_size=32 if weight_only else None, symmetric=False if scheme.endswith("-asym") else None)
    return quantize(tiny_checkpoints["qwen3_vl_moe"], out, *calib_split, recipe, progress=False).out_dir


def _docs_moe_mapping() -> str:
    """The code docs/serving.md gives users for loading a quantized Qwen3-VL-MoE in plain transformers (its
    from_pretrained line left out), read as the serve check reads it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve" / "generate.py"
    spec = importlib.util.spec_from_file_location("serve_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.docs_moe_mapping()


def test_plain_transformers_needs_the_experts_mapping(tiny_checkpoints, calib_split, tmp_path):
    """A known limit, stated in docs/serving.md: transformers 5 keeps MoE experts as fused 3-D parameters and
    its qwen3_vl_moe conversion mapping reads the hub's fused layout only, so a plain from_pretrained of a
    per-expert output reports the fused experts MISSING (it would run on random experts). When this test
    fails, transformers has learnt to load it: update the docs and drop the mapping from them."""
    out = _quantized_moe(tiny_checkpoints, calib_split, tmp_path / "out", "W4A16")
    code = ("import sys, json\nfrom transformers import AutoModelForImageTextToText\n"
            "_, info = AutoModelForImageTextToText.from_pretrained(sys.argv[1], output_loading_info=True)\n"
            "print(json.dumps(sorted(info['missing_keys'])))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=_PLAIN_ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in missing


@pytest.mark.parametrize("scheme", ["W4A16", "W3A16", "W8A16", "W4A16-asym", "W8A8", "W4A8"])
def test_plain_transformers_loads_experts_with_the_mapping(scheme, tiny_checkpoints, calib_split, tmp_path):
    """The docs' conversion mapping, run in a fresh interpreter that never imports tlq: symmetric packed
    experts load with tlq's own logits; the schemes `tlq.serving` says transformers cannot load (zero points,
    int8-stored experts) fail at load, loudly, never with random or misread experts."""
    from tlq.api import prepare_samples
    from tlq.models.processing import load_processor

    out = _quantized_moe(tiny_checkpoints, calib_split, tmp_path / "out", scheme)
    model, adapter = load_model(tiny_checkpoints["qwen3_vl_moe"])
    sample = prepare_samples(model, adapter, load_processor(out), *calib_split, Recipe(num_samples=1))[0]
    proc = _run_plain(_docs_moe_mapping() + "\n" + _PLAIN, out, sample, tmp_path)
    parsed = parse_scheme(scheme.removesuffix("-asym"), symmetric=False if scheme.endswith("-asym") else None)
    transformers = {s.engine: s for s in where_it_runs(parsed, routed_experts=True)}["transformers"]
    if transformers.runs is False:
        assert proc.returncode != 0 and "conversion of the weights" in proc.stderr
        return
    _assert_plain_logits_are_ours(proc, out, sample, tmp_path)


def test_where_each_scheme_runs():
    runs = {name: {s.engine: s.runs for s in where_it_runs(parse_scheme(name))}
            for name in ("W4A16", "W3A16", "W8A8", "W4A8")}
    assert runs["W4A16"] == {"vLLM GPU": True, "vLLM CPU": True, "transformers": True}
    assert runs["W3A16"]["vLLM CPU"] is False and runs["W3A16"]["transformers"] is None  # ct 0.17 misreads 3-bit
    assert runs["W8A8"] == {"vLLM GPU": True, "vLLM CPU": True, "transformers": True}
    assert runs["W4A8"]["vLLM GPU"] is None and runs["W4A8"]["vLLM CPU"] is True
    assert {s.engine: s.runs for s in where_it_runs(parse_scheme("W4A16", symmetric=False))}["transformers"] is None
    # MoE experts (served in docs/serving.md): vLLM's CPU int4 and int8 MoE kernels need AMX; none takes zero
    # points, W4A8 or 8-bit weight-only experts
    moe = {f"{name}{'-asym' if symmetric is False else ''}":
           {s.engine: s for s in where_it_runs(parse_scheme(name, symmetric=symmetric), routed_experts=True)}
           for name, symmetric in (("W4A16", None), ("W8A8", None), ("W4A8", None), ("W8A16", None),
                                   ("W4A16", False))}
    assert {e: s.runs for e, s in moe["W4A16"].items()} == {"vLLM GPU": None, "vLLM CPU": None, "transformers": None}
    assert "mapping" in moe["W4A16"]["transformers"].note  # docs/serving.md's conversion mapping
    w3 = {s.engine: s for s in where_it_runs(parse_scheme("W3A16"), routed_experts=True)}["transformers"]
    assert "mapping" in w3.note and "compressed-tensors >= 0.20" in w3.note  # the dense 3-bit caveat kept
    assert moe["W8A8"]["transformers"].runs is False and moe["W4A16-asym"]["transformers"].runs is False
    assert moe["W8A8"]["vLLM CPU"].runs is None
    assert "AMX" in moe["W4A16"]["vLLM CPU"].note and "AMX" in moe["W8A8"]["vLLM CPU"].note
    assert moe["W4A8"]["vLLM CPU"].runs is False and moe["W8A16"]["vLLM CPU"].runs is False
    assert moe["W4A16-asym"]["vLLM CPU"].runs is False and "zero points" in moe["W4A16-asym"]["vLLM CPU"].note


@pytest.mark.parametrize(("config", "scheme", "best"), [("qwen2-vl-72b-instruct", "W4A16", 1),
                                                        ("qwen2-vl-72b-instruct", "W4A16-g64", 2),
                                                        ("qwen2-vl-7b-instruct", "W4A16", 4),
                                                        ("qwen2-vl-72b-instruct", "W4A8", 8)])
def test_largest_tensor_parallel_size_the_groups_allow(config, scheme, best):
    """72B's MLP is 29568 wide: 14784 inputs per rank at TP 2, not a multiple of 128 but of 64 (7392 at
    TP 4 is not); 7B's 18944 gives 4736 = 37 x 128 at TP 4 and 2368 at TP 8 (not a multiple of 128);
    per-channel W4A8 has no group to split."""
    from pathlib import Path

    model_dir = Path(__file__).parent / "fixtures" / "configs" / config
    adapter = adapter_for(read_model_type(model_dir))
    assert largest_tp(linear_in_features(model_dir), adapter.row_parallel, parse_scheme(scheme)) == best


def test_quantize_refuses_a_tp_size_before_calibrating(tiny_checkpoints, calib_split, tmp_path, capsys):
    from tlq.cli import main

    argv = ["quantize", str(tiny_checkpoints["qwen2_vl"]), "--out", str(tmp_path / "o"), "--calib",
            str(calib_split[0]), "--images", str(calib_split[1]), "--scheme", "W4A16-g64", "--tp", "2",
            "--num-samples", "2", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tp 2" in err[0] and "tensor parallel 1 at most" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tlq-work").exists()
    with pytest.raises(TlqError):
        check_tp(parse_scheme("W4A16-g64"), {"mlp.down_proj": 96}, ("mlp.down_proj",), (2,))


def test_quantize_says_where_the_scheme_runs_before_calibrating(tiny_checkpoints, calib_split, tmp_path, capsys):
    from tlq.cli import main

    argv = ["quantize", str(tiny_checkpoints["qwen2_vl"]), "--out", str(tmp_path / "o"), "--calib",
            str(calib_split[0]), "--images", str(calib_split[1]), "--scheme", "W3A16-g32", "--num-samples", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "tlq: W3A16 (symmetric, group 32) runs in" in err
    assert "tlq: warning: vLLM CPU cannot run W3A16 as written" in err
    assert err.index("tlq: warning") < err.index("wrote") if "wrote" in err else True
