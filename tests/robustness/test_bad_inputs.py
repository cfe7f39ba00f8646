"""Classes 4, 5, 6 and 7: bad calibration data, hostile image paths, broken images and plain option
mistakes are refused with one line before any work, leaving nothing behind; image paths stay inside
the image folder unless the user says otherwise."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

GOOD_TURNS = [{"from": "human", "value": "<image>\nwhat color is the circle ?"}, {"from": "gpt", "value": "red"}]


def _first_image(w) -> str:
    return json.loads(w.calib.read_text())[0]["image"]


def _write_records(w, rows) -> None:
    w.calib.write_text(json.dumps(rows))


def _with_first(w, **fields) -> None:
    rows = json.loads(w.calib.read_text())
    rows[0].update(fields)
    _write_records(w, rows)


def _image_case(maker):
    """Replace every record's image file by what `maker(path)` writes (any record may be drawn)."""
    def prepare(w):
        for row in json.loads(w.calib.read_text()):
            maker(w.data / row["image"])
    return prepare


def _big_png(path):
    # 20000 x 20000 in 1-bit mode: a few hundred kB on disk, 400 M pixels once decoded.
    Image.new("1", (20000, 20000)).save(path, format="PNG")


DATA_CASES = {
    "image is a number": (lambda w: _with_first(w, image=5), "'image' must be a path"),
    "image list holds a number": (lambda w: _with_first(w, image=["a.png", 3]), "'image' must be a path"),
    "image is an empty string": (lambda w: _with_first(w, image=""), "'image' must be a path"),
    "image is an object": (lambda w: _with_first(w, image={"path": "x"}), "'image' must be a path"),
    "absolute image path outside the folder": (lambda w: _with_first(w, image=str(w.unrelated)), "outside the image folder"),
    "image path climbs out with ..": (lambda w: _with_first(w, image="../../../../../../etc/passwd"),
                                      "outside the image folder"),
    "image symlink leads outside": (lambda w: (os.symlink(w.unrelated, w.data / "images" / "link.png"),
                                               _with_first(w, image="images/link.png")), "outside the image folder"),
    "image missing": (lambda w: _with_first(w, image="images/ghost.png"), "is missing"),
    "image is random bytes": (_image_case(lambda p: p.write_bytes(os.urandom(512))), "cannot read image"),
    "image is empty": (_image_case(lambda p: p.write_bytes(b"")), "cannot read image"),
    "image is a truncated PNG": (_image_case(lambda p: p.write_bytes(p.read_bytes()[:60])), "cannot read image"),
    "decompression bomb": (_image_case(_big_png), "pixels"),
    "1 x 4000 image": (_image_case(lambda p: Image.new("RGB", (1, 4000)).save(p, format="PNG")), "aspect ratio"),
    "calib nested too deeply": (lambda w: w.calib.write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
    "calib JSONL nested too deeply": (lambda w: w.calib.write_text('{"a": ' * 50000 + "1" + "}" * 50000),
                                      "nested too deeply"),
    "calib is a JSON string": (lambda w: w.calib.write_text('"hello"'), "expected an object"),
    "calib holds one object, not a list": (lambda w: w.calib.write_text('{"image": "x"}'), "is missing"),
    "calib is empty": (lambda w: w.calib.write_text(""), "is empty"),
    "calib is an empty list": (lambda w: w.calib.write_text("[]"), "has no records"),
    "calib is not UTF-8": (lambda w: w.calib.write_bytes(b"\xff\xfe[\x00"), "cannot read calibration file"),
    "calib is not JSON": (lambda w: w.calib.write_text("[{"), "not valid JSON"),
    "calib JSONL bad line": (lambda w: w.calib.write_text('{"image": "a"}\n{oops\n'), "line 2"),
    "record is a list": (lambda w: _write_records(w, [[1, 2]]), "expected an object"),
    "record without conversations": (lambda w: _write_records(w, [{"image": _first_image(w)}]), "conversations"),
    "turn without from": (lambda w: _with_first(w, conversations=[{"value": "hi"}]), "each turn needs"),
    "turn value not a string": (lambda w: _with_first(w, conversations=[{"from": "human", "value": 3}]),
                                "each turn needs"),
    "turns not a list": (lambda w: _with_first(w, conversations="hello"), "conversations"),
    "no assistant turn": (lambda w: _with_first(w, conversations=GOOD_TURNS[:1]), "no assistant"),
    "two placeholders for one image": (lambda w: _with_first(w, conversations=[
        {"from": "human", "value": "<image><image> hi"}, GOOD_TURNS[1]]), "placeholders"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_calibration_data_is_refused(case, workspace, refused_cleanly):
    prepare, words = DATA_CASES[case]
    prepare(workspace)
    refused_cleanly(workspace.quantize_argv(), words)


@pytest.mark.parametrize("case", ["image is a number", "image path climbs out with ..", "decompression bomb",
                                  "calib nested too deeply", "1 x 4000 image"])
def test_eval_refuses_the_same_data(case, workspace, refused_cleanly):
    prepare, words = DATA_CASES[case]
    prepare(workspace)
    refused_cleanly(["eval", workspace.model, "--data", workspace.calib, "--images", workspace.data], words)


@pytest.mark.parametrize("case", ["image is a number", "absolute image path outside the folder", "image is random bytes"])
def test_importance_refuses_the_same_data(case, workspace, refused_cleanly):
    prepare, words = DATA_CASES[case]
    prepare(workspace)
    refused_cleanly(["importance", workspace.model, "--calib", workspace.calib, "--images", workspace.data, "--out",
                     workspace.root / "imp.safetensors"], words)


def test_an_outside_image_is_never_opened(workspace, refused_cleanly, monkeypatch):
    """Confinement is checked on the path, before PIL (or anything) opens the file."""
    import PIL.Image

    opened = []
    original = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda path, *a, **k: (opened.append(str(path)), original(path, *a, **k))[1])
    _with_first(workspace, image="../../../../../../etc/passwd")
    refused_cleanly(workspace.quantize_argv(), "outside the image folder")
    assert not [p for p in opened if "passwd" in p]


def test_outside_images_are_allowed_when_asked(workspace, run_cli, tmp_path):
    """The documented success: --allow-outside-images takes an image from elsewhere."""
    elsewhere = tmp_path / "elsewhere.png"
    (workspace.data / _first_image(workspace)).rename(elsewhere)
    _with_first(workspace, image=str(elsewhere))
    assert run_cli(workspace.quantize_argv()).code == 2
    outcome = run_cli(workspace.quantize_argv("--allow-outside-images"))
    assert outcome.code == 0, outcome.err[-3:]


def test_images_folder_missing_or_a_file(workspace, refused_cleanly):
    refused_cleanly(workspace.quantize_argv(images=workspace.root / "nowhere"), "does not exist")
    refused_cleanly(workspace.quantize_argv(images=workspace.unrelated), "does not exist")


def test_calib_is_a_folder(workspace, refused_cleanly):
    refused_cleanly(workspace.quantize_argv(calib=workspace.data), "does not exist")


# Plain option mistakes: refused before the model is loaded, so no work folder can appear.
QUANTIZE_OPTIONS = {
    "unknown device": (["--device", "gpu0"], "unknown device"),
    "cuda without CUDA": (["--device", "cuda:3"], "cuda"),
    "unknown importance": (["--method", "tlq", "--importance", "magic"], "unknown importance score"),
    "unknown backend": (["--method", "tlq", "--backend", "fast"], "unknown backend"),
    "unknown weighting": (["--weighting", "heavy"], "unknown weighting"),
    "unknown target": (["--target", "both"], "unknown target"),
    "unknown scale loss": (["--scale-loss", "huber"], "unknown scale loss"),
    "unknown method": (["--method", "qat"], "unknown method"),
    "unknown scheme": (["--scheme", "W5A5"], "unknown scheme"),
    "group size 3": (["--group-size", "3"], "group size"),
    "group size 48": (["--scheme", "W4A16", "--group-size", "48"], "power of two"),
    "scheme and group size disagree": (["--scheme", "W4A16-g32", "--group-size", "64"], "disagree"),
    "a word where a number goes": (["--num-samples", "many"], "invalid int value"),
    "unknown flag": (["--fast"], "unrecognized arguments"),
    "unknown dtype": (["--dtype", "float8"], "invalid choice"),
    "num samples 0": (["--num-samples", "0"], "--num-samples"),
    "num samples -15": (["--num-samples", "-15"], "--num-samples"),
    "max length 4": (["--max-length", "4"], "--max-length"),
    "dampening 0": (["--dampening", "0"], "dampening"),
    "dampening nan": (["--dampening", "nan"], "dampening"),
    "block size 0": (["--block-size", "0"], "block size"),
    "floor 2": (["--floor", "2"], "floor"),
    "clip -1": (["--clip", "-1"], "--clip"),
    "keep ratio 0": (["--method", "tlq", "--keep-ratio", "0"], "--keep-ratio"),
    "keep ratio and budget": (["--method", "tlq", "--keep-ratio", "0.5", "--token-budget", "9"], "not both"),
    "token budget 0": (["--method", "tlq", "--token-budget", "0"], "--token-budget"),
    "token budget without importance": (["--method", "gptq", "--token-budget", "64"], "use it with --method tlq"),
    "min kind share 1.5": (["--min-kind-share", "1.5"], "--min-kind-share"),
    "dist timeout 0": (["--dist-timeout", "0"], "--dist-timeout"),
    "smoothquant weight-only": (["--method", "smoothquant"], "W4A8 or W8A8"),
    "W4A8 with a group": (["--scheme", "W4A8-g64"], "per-channel"),
    "lazy without resume": (["--lazy", "--no-resume"], "drop --no-resume"),
    "W9A16": (["--scheme", "W9A16"], "unknown scheme"),
    "asymmetric W8A8": (["--scheme", "W8A8", "--no-symmetric"], "symmetric"),
}


@pytest.mark.parametrize("case", sorted(QUANTIZE_OPTIONS))
def test_option_mistakes_are_refused_before_any_work(case, workspace, refused_cleanly):
    extra, words = QUANTIZE_OPTIONS[case]
    argv = workspace.quantize_argv()
    if "--scheme" in extra:
        at = argv.index("--scheme")
        argv = argv[:at] + argv[at + 2:]
    refused_cleanly(argv + extra, words)


def test_out_whose_parent_is_a_file(workspace, refused_cleanly):
    refused_cleanly(workspace.quantize_argv(out=workspace.unrelated / "out"), "is a file")


EVAL_OPTIONS = {
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "num samples -15": (["--num-samples", "-15"], "--num-samples"),
    "num samples 0": (["--num-samples", "0"], "--num-samples"),
    "unknown device": (["--device", "tpu"], "unknown device"),
    "out under a file": (["--out", "{unrelated}/r.json"], "is a file"),
    "missing data": (["--data", "{root}/nothing.json"], "does not exist"),
    "reference missing": (["--reference", "{root}/nothing"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(EVAL_OPTIONS))
def test_eval_option_mistakes(case, workspace, refused_cleanly):
    extra, words = EVAL_OPTIONS[case]
    extra = [e.format(unrelated=workspace.unrelated, root=workspace.root) for e in extra]
    argv = ["eval", workspace.model, "--data", workspace.calib, "--images", workspace.data]
    if "--data" in extra:
        argv = argv[:2] + argv[4:]
    refused_cleanly(argv + extra, words)


IMPORTANCE_OPTIONS = {
    "unknown score": (["--score", "magic"], "unknown importance score"),
    "num samples 0": (["--num-samples", "0"], "--num-samples"),
    "unknown device": (["--device", "npu"], "unknown device"),
    "out under a file": (["--out", "{unrelated}/i.safetensors"], "is a file"),
}


@pytest.mark.parametrize("case", sorted(IMPORTANCE_OPTIONS))
def test_importance_option_mistakes(case, workspace, refused_cleanly):
    extra, words = IMPORTANCE_OPTIONS[case]
    extra = [e.format(unrelated=workspace.unrelated) for e in extra]
    argv = ["importance", workspace.model, "--calib", workspace.calib, "--images", workspace.data]
    if "--out" not in extra:
        argv += ["--out", str(workspace.root / "imp.safetensors")]
    refused_cleanly(argv + extra, words)


PLAN_CASES = {
    "no model": (lambda w: w.root / "nothing", [], "does not exist"),
    "config a list": (lambda w: (w.model / "config.json").write_text("[]") and w.model, [], "not an object"),
    "unsupported": (lambda w: (w.model / "config.json").write_text('{"model_type": "bert"}') and w.model, [],
                    "tlq supports"),
    "devices 0": (lambda w: w.model, ["--devices", "0"], "--devices"),
    "bad memory size": (lambda w: w.model, ["--device-memory", "lots"], "memory"),
    "samples 0": (lambda w: w.model, ["--samples", "0"], "--samples"),
    "tokens per sample 0": (lambda w: w.model, ["--tokens-per-sample", "0"], "--tokens-per-sample"),
    "bad target": (lambda w: w.model, ["--target", "sideways"], "target"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_plan_mistakes(case, workspace, refused_cleanly):
    model, extra, words = PLAN_CASES[case]
    refused_cleanly(["plan", model(workspace), *extra], words)


@pytest.mark.parametrize("where", ["missing folder", "nested missing folders"])
def test_file_outputs_in_a_missing_folder_are_written(where, workspace, run_cli):
    """The documented success: eval/importance --out in a folder that does not exist yet creates it."""
    folder = workspace.root / "reports" if where == "missing folder" else workspace.root / "a" / "b"
    outcome = run_cli(["eval", workspace.model, "--data", workspace.calib, "--images", workspace.data,
                       "--num-samples", "2", "--out", folder / "r.json"])
    assert outcome.code == 0, outcome.err[-3:]
    assert json.loads((folder / "r.json").read_text())["num_questions"] > 0
    outcome = run_cli(["importance", workspace.model, "--calib", workspace.calib, "--images", workspace.data,
                       "--num-samples", "2", "--out", folder / "imp.safetensors"])
    assert outcome.code == 0, outcome.err[-3:]
    assert sorted(os.listdir(folder)) == ["imp.safetensors", "r.json"]  # no temporary file left


def test_stress_never_replaces_an_existing_folder_silently(workspace, refused_cleanly):
    existing = workspace.root / "variant"
    existing.mkdir()
    (existing / "keep.txt").write_text("the user's")
    refused_cleanly(["stress", workspace.model, "--out", existing, "--kind", "weight"], "already exists")


def test_a_degenerate_hessian_is_one_line_naming_the_cause():
    """GPTQ's last resort (no damping makes H positive definite) is a refusal, not a RuntimeError."""
    import torch

    from tlq.errors import TlqError
    from tlq.quant.gptq import _inverse_cholesky

    with pytest.raises(TlqError, match="NaN or inf"):
        _inverse_cholesky(torch.full((4, 4), float("nan"), dtype=torch.float64), 0.01)
    with pytest.raises(TlqError, match="degenerate"):
        _inverse_cholesky(-torch.eye(4, dtype=torch.float64), 0.01)
