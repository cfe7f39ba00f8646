"""Class 1, data loss: no output (nor its work folder, nor --offload-dir) may be, hold, or lie inside an
input, compared by resolved path with symlinks followed; so `--overwrite` can only replace an earlier output."""

from __future__ import annotations

import os

import pytest

# name -> (function of the workspace giving the extra quantize arguments, expected words)
QUANTIZE_LAYOUTS = {
    "out is the model": (lambda w: dict(out=w.model), "is the model folder"),
    "out holds model, calib and images": (lambda w: dict(out=w.root), "holds"),
    "out is the images folder": (lambda w: dict(out=w.data), "holds --calib"),  # calib.json lives there
    "out is the calibration file": (lambda w: dict(out=w.calib), "is --calib"),
    "out is inside the model": (lambda w: dict(out=w.model / "quantized"), "is inside the model folder"),
    "out is inside the images folder": (lambda w: dict(out=w.data / "q"), "is inside --images"),
    "out is model/../model": (lambda w: dict(out=w.model / ".." / "model"), "is the model folder"),
    "out relative to the model": (lambda w: dict(out=os.path.relpath(w.model)), "is the model folder"),
}


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
@pytest.mark.parametrize("layout", sorted(QUANTIZE_LAYOUTS))
def test_quantize_output_never_overlaps_an_input(layout, overwrite, workspace, refused_cleanly):
    where, words = QUANTIZE_LAYOUTS[layout]
    paths = where(workspace)
    extra = ["--overwrite"] if overwrite else []
    refused_cleanly(workspace.quantize_argv(*extra, **paths), words)


SYMLINK_LAYOUTS = {
    # (where the symlink points, which argument names it, expected words)
    "out is a link to the model": ("model", "out", "is the model folder"),
    "out is a link to the workspace": ("root", "out", "holds"),
    "out is a link to the images": ("data", "out", "holds --calib"),
    "the model is given through a link, out is the real model": ("model", "model", "is the model folder"),
    "the images are given through a link, out is the real folder": ("data", "images", "is --images"),
    "the model is given through a link, out inside the real model": ("model", "model/inside", "is inside"),
}


@pytest.mark.parametrize("layout", sorted(SYMLINK_LAYOUTS))
def test_symlinks_are_resolved_before_comparing(layout, workspace, refused_cleanly, tmp_path):
    target_name, argument, words = SYMLINK_LAYOUTS[layout]
    target = {"model": workspace.model, "root": workspace.root, "data": workspace.data}[target_name]
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    if argument == "out":
        argv = workspace.quantize_argv("--overwrite", out=link)
    elif argument == "model":
        argv = workspace.quantize_argv("--overwrite", model=link, out=workspace.model)
    elif argument == "model/inside":
        argv = workspace.quantize_argv("--overwrite", model=link, out=workspace.model / "inside")
    else:
        argv = workspace.quantize_argv("--overwrite", images=link, calib=workspace.root / "calib.json", out=workspace.data)
        workspace.calib.rename(workspace.root / "calib.json")
    refused_cleanly(argv, words, root=tmp_path)


def test_the_records_images_are_inputs(workspace, refused_cleanly):
    """Without --images the images are found beside the calibration file: an --out holding them is refused."""
    argv = workspace.quantize_argv("--overwrite", out=workspace.data / "images")
    at = argv.index("--images")
    refused_cleanly(argv[:at] + argv[at + 2:], "holds calibration image")


OFFLOAD_LAYOUTS = {
    "offload is the model": (lambda w: w.model, "is the model folder"),
    "offload is the images folder": (lambda w: w.data, "holds --calib"),
    "offload holds the inputs": (lambda w: w.root, "holds"),
    "offload is the output": (lambda w: w.root / "out", "is --offload-dir"),
    "offload is inside the output": (lambda w: w.root / "out" / "spill", "holds --offload-dir"),
    "offload is a file": (lambda w: w.unrelated, "is a file"),
}


@pytest.mark.parametrize("layout", sorted(OFFLOAD_LAYOUTS))
def test_offload_dir_is_an_output_too(layout, workspace, refused_cleanly):
    where, words = OFFLOAD_LAYOUTS[layout]
    refused_cleanly(workspace.quantize_argv("--overwrite", "--offload-dir", str(where(workspace))), words)


def test_the_work_folder_may_not_be_an_input(workspace, refused_cleanly):
    """OUT.tlq-work/ is written and finally removed: a model folder with that name is refused."""
    model = workspace.root / "q.tlq-work"
    workspace.model.rename(model)
    refused_cleanly(workspace.quantize_argv(model=model, out=workspace.root / "q"), "its work folder")


def _eval(w, out):
    return ["eval", w.model, "--data", w.calib, "--images", w.data, "--num-samples", "2", "--out", out]


def _importance(w, out):
    return ["importance", w.model, "--calib", w.calib, "--images", w.data, "--num-samples", "2", "--out", out]


FILE_OUTPUTS = {
    "eval --out is the data file": (_eval, lambda w: w.calib, "is --data"),
    "eval --out inside the model": (_eval, lambda w: w.model / "report.json", "is inside the model folder"),
    "eval --out is the model's config": (_eval, lambda w: w.model / "config.json", "is inside the model folder"),
    "eval --out is an image": (_eval, lambda w: next((w.data / "images").iterdir()), "is inside --images"),
    "eval --out is a folder": (_eval, lambda w: w.root, "is a folder"),
    "importance --out is the calibration file": (_importance, lambda w: w.calib, "is --calib"),
    "importance --out is the weights": (_importance, lambda w: w.model / "model.safetensors", "is inside the model"),
    "importance --out inside the images": (_importance, lambda w: w.data / "imp.safetensors", "is inside --images"),
}


@pytest.mark.parametrize("case", sorted(FILE_OUTPUTS))
def test_file_outputs_never_replace_an_input(case, workspace, refused_cleanly):
    command, where, words = FILE_OUTPUTS[case]
    refused_cleanly(command(workspace, where(workspace)), words)


def test_eval_reference_is_an_input(workspace, refused_cleanly):
    argv = _eval(workspace, workspace.root / "ref" / "r.json") + ["--reference", str(workspace.root / "ref")]
    (workspace.root / "ref").mkdir()
    refused_cleanly(argv, "is inside --reference")


@pytest.mark.parametrize("where", ["model", "root"])
def test_stress_output_never_overlaps_the_model(where, workspace, refused_cleanly):
    out = workspace.model if where == "model" else workspace.root
    refused_cleanly(["stress", workspace.model, "--out", out, "--kind", "weight"], "the model folder")


@pytest.mark.parametrize("where", ["model", "root", "data"])
def test_bench_output_never_overlaps_an_input(where, workspace, refused_cleanly):
    out = {"model": workspace.model, "root": workspace.root, "data": workspace.data}[where]
    refused_cleanly(["bench", workspace.model, "--calib", workspace.calib, "--images", workspace.data, "--eval",
                     workspace.calib, "--out", out], "--out")


@pytest.mark.parametrize("method", ["gptq", "tlq"])  # solved weights and scale folds go into the loaded tensors
def test_overwrite_replaces_an_earlier_output_and_nothing_else(workspace, run_cli, method):
    """The documented success: --overwrite on an earlier tlq output replaces it; every input is intact
    (calibration writes into the checkpoint's memory-mapped tensors: a private mapping must keep the file
    as it was), and nothing but the output is left beside the inputs."""
    from conftest import snapshot

    argv = workspace.quantize_argv(out=workspace.root / "out") + ["--method", method]
    assert run_cli(argv).code == 0
    inputs = {name: snapshot(path) for name, path in [("model", workspace.model), ("data", workspace.data)]}
    first = snapshot(workspace.root / "out")
    assert run_cli(argv + ["--overwrite", "--seed", "1"]).code == 0
    assert {name: snapshot(path) for name, path in [("model", workspace.model), ("data", workspace.data)]} == inputs
    assert sorted(os.listdir(workspace.root)) == ["data", "model", "notes.txt", "out"]
    assert snapshot(workspace.root / "out") != first  # really replaced (another seed)
