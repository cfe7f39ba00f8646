"""Bad input: exit status 2, one line naming the problem, no traceback, no output left behind."""

import json
import os
import subprocess
import sys

import pytest

from tlq.cli import main


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.fixture
def good(tiny_checkpoints, calib_split, tmp_path):
    path, folder = calib_split
    return {"model": str(tiny_checkpoints["qwen2_vl"]), "calib": str(path), "images": str(folder),
            "out": str(tmp_path / "out")}


def _argv(g, **over):
    g = {**g, **over}
    return ["quantize", g["model"], "--out", g["out"], "--calib", g["calib"], "--images", g["images"],
            "--scheme", over.get("scheme", "W4A16-g32"), "--num-samples", "2", "--quiet"]


def _bad_cases(tmp_path, good):
    unsupported = tmp_path / "llama"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "llama"}))
    empty = tmp_path / "empty.json"
    empty.write_text("")
    missing_image = tmp_path / "missing.json"
    missing_image.write_text(json.dumps([{"image": "images/ghost.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the circle ?"}, {"from": "gpt", "value": "red"}]}]))
    return {
        "missing model": ({"model": str(tmp_path / "nowhere")}, "does not exist"),
        "unsupported": ({"model": str(unsupported)}, "unsupported architecture 'llama'"),
        "bad scheme": ({"scheme": "W5A5"}, "unknown scheme"),
        "empty calib": ({"calib": str(empty)}, "is empty"),
        "missing image": ({"calib": str(missing_image)}, "ghost.png is missing"),
    }


@pytest.mark.parametrize("case", ["missing model", "unsupported", "bad scheme", "empty calib", "missing image"])
def test_bad_input_is_one_line_exit_2(case, good, tmp_path, capsys):
    over, words = _bad_cases(tmp_path, good)[case]
    code, lines = _run(_argv(good, **over), capsys)
    assert code == 2
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("tlq: error:")
    assert not os.path.exists(good["out"])
    assert not [p for p in os.listdir(os.path.dirname(good["out"])) if p.startswith(".out.tmp")]


def test_quantize_command_writes_a_checkpoint(good, capsys):
    code = main(_argv(good))
    capsys.readouterr()
    assert code == 0
    assert os.path.isfile(os.path.join(good["out"], "config.json"))
    recipe = json.load(open(os.path.join(good["out"], "tlq_recipe.json")))
    assert recipe["calibration"]["num_samples"] == 2 and len(recipe["calibration"]["data_sha256"]) == 64
    assert recipe["versions"]["tlq"]
    # where the time went (tlq.phases): every phase of a GPTQ run, export included, and one entry per layer
    phases = recipe["phase_seconds"]
    assert {"load", "samples", "capture", "importance", "reference", "observe", "solve", "propagate", "save",
            "export"} <= set(phases) and all(v >= 0 for v in phases.values())
    assert len(recipe["layer_seconds"]) == len(recipe["layer_relative_error"]) == 2
    # the phases that raised the peak RSS (tlq.phases; empty when the test process's own mark was higher)
    assert all(name in phases and mib > 0 for name, mib in recipe["phase_peak_rss_mib"].items())
    # A second run into the same folder is refused rather than overwriting it.
    code, lines = _run(_argv(good), capsys)
    assert code == 2 and "already exists" in lines[0]


def test_subprocess_has_no_traceback(good, tmp_path):
    argv = _argv(good, scheme="W9A16")
    proc = subprocess.run([sys.executable, "-m", "tlq", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "unknown scheme" in proc.stderr


def _quantize_args(*flags: str):
    from tlq.cli import build_parser

    return build_parser().parse_args(["quantize", "model", "--out", "o", "--calib", "c.json", *flags])


def test_every_recipe_knob_is_a_flag_named_after_it_with_the_recipes_default():
    """One name and one default per knob: no flag means the Recipe default, and each field's flag sets it."""
    import dataclasses

    from tlq.cli import _recipe_from
    from tlq.recipe import Recipe

    assert _recipe_from(_quantize_args()) == Recipe()
    values = {"method": "tlq", "scheme": "W3A16", "group_size": 64, "symmetric": False, "num_samples": 7, "seed": 3,
              "max_length": 512, "dampening": 0.05, "block_size": 64, "expert_min_tokens": 16, "act_order": True,
              "weight_grid": "mse",
              "true_sequential": False, "exposure": False, "target": "asymmetric", "backend": "scale",
              "importance_score": "gx", "importance_pass": "streamed", "weighting": "importance",
              "importance_floor": 0.3, "importance_clip": 4.0, "keep_ratio": 0.5, "token_budget": None,
              "min_kind_share": 0.2, "scale_grid": 10, "scale_loss": "mae", "scale_max_tokens": 999,
              "scale_form": "duo", "scale_alpha_one": True, "scale_rescore_top": 3, "smooth_alpha": 0.8, "device": "cpu"}
    assert set(values) == {f.name for f in dataclasses.fields(Recipe)} - {"extra"}
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    recipe = _recipe_from(_quantize_args(*flags))
    assert {name: getattr(recipe, name) for name in values} == values


def test_a_saved_recipe_runs_again_and_given_flags_override_it(tmp_path):
    from tlq.cli import _recipe_from
    from tlq.recipe import Recipe

    saved = Recipe(method="tlq", scheme="W3A16-g64", num_samples=9, importance_floor=0.25, scale_form="duo")
    path = tmp_path / "tlq_recipe.json"
    path.write_text(json.dumps({"recipe": saved.to_dict(), "scheme": {}}))
    assert _recipe_from(_quantize_args("--recipe", str(path))) == saved
    assert _recipe_from(_quantize_args("--recipe", str(path), "--floor", "0.5", "--seed", "2")) == \
        Recipe(**{**saved.to_dict(), "importance_floor": 0.5, "seed": 2})
