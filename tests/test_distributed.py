"""Data-parallel calibration under torchrun (gloo, CPU): the result does not depend on the number of ranks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlq.distributed import Ranks, samples_per_chunk
from tlq.importance import TokenImportance
from stop_at import stopping

WORLD_SIZES = (1, 2, 3)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _torchrun(nproc: int, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    # The c10d rendezvous on port 0 lets the OS assign the port when it binds: a port picked here and
    # released before torchrun binds it can be taken by another process meanwhile.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "tlq", *argv]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12))
               for k in a)


def test_shards_are_contiguous_and_balanced():
    shards = [list(Ranks(rank=r, size=3).shard(8)) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7]]
    # In whole chunks of consecutive samples (so every rank count forms the same solver products)...
    chunk = samples_per_chunk(100)
    assert chunk == 6
    shards = [Ranks(rank=r, size=3).shard(100) for r in range(3)]
    assert [s.start for s in shards] == [0, 36, 72] and shards[-1].stop == 100
    # ...unless there are fewer chunks than ranks: then one sample at a time.
    shards = [Ranks(rank=r, size=20).shard(100) for r in range(20)]
    assert [len(s) for s in shards] == [5] * 20 and shards[-1].stop == 100
    owners = Ranks(rank=0, size=2).owners([9.0, 1.0, 1.0, 4.0, 4.0])
    loads = [sum(c for c, o in zip([9.0, 1.0, 1.0, 4.0, 4.0], owners) if o == r) for r in range(2)]
    assert sorted(loads) == [9.0, 10.0]


@pytest.mark.parametrize(("method", "scheme", "extra"), [("gptq", "W4A16-g32", []), ("tlq", "W4A8", []),
                                                        ("awq", "W4A16-g32", ["--scale-max-tokens", "100"]),
                                                        ("awq_gptq", "W3A16-g32", ["--scale-max-tokens", "100"])])
def test_quantized_weights_do_not_depend_on_world_size(method, scheme, extra, tiny_checkpoints, calib_split,
                                                       tmp_path):
    """1, 2 and 3 ranks: same weights, grids and scales (TLQ W4A8 = importance + scale search + GPTQ; AWQ
    scoring a 100-token draw over every rank's tokens; AWQ + GPTQ rescoring its candidates on that draw's
    Hessian, summed over the ranks)."""
    path, images = calib_split
    outputs = {}
    for world in WORLD_SIZES:
        out = tmp_path / f"out{world}"
        run = _torchrun(world, ["quantize", str(tiny_checkpoints["qwen2_vl"]), "--out", str(out), "--calib",
                                str(path), "--images", str(images), "--method", method, "--scheme", scheme,
                                "--num-samples", "6", "--quiet", *extra])
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[world] = load_file(str(out / "model.safetensors"))
        assert not (tmp_path / f"out{world}.tlq-work").exists()
    for world in WORLD_SIZES[1:]:
        assert _max_relative_difference(outputs[1], outputs[world]) <= 1e-5, world


def test_chunked_statistics_do_not_depend_on_world_size(tiny_checkpoints, tmp_path):
    """32 samples: the solvers take them two at a time, and 1 and 3 ranks form the same chunks."""
    from tlq.data.synthetic import SceneConfig, write_split

    assert samples_per_chunk(32) == 2
    folder = tmp_path / "calib"
    path = write_split(folder, 32, seed=5, config=SceneConfig(grid=4, scene=3, questions_per_image=1), name="calib")
    outputs = {}
    for world in (1, 3):
        out = tmp_path / f"out{world}"
        run = _torchrun(world, ["quantize", str(tiny_checkpoints["qwen2_vl"]), "--out", str(out), "--calib",
                                str(path), "--images", str(folder), "--method", "gptq", "--scheme", "W4A16-g32",
                                "--num-samples", "32", "--quiet"])
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[world] = load_file(str(out / "model.safetensors"))
    assert _max_relative_difference(outputs[1], outputs[3]) <= 1e-5


def test_importance_does_not_depend_on_world_size(tiny_checkpoints, calib_split, tmp_path):
    path, images = calib_split
    results = {}
    for world in WORLD_SIZES:
        out = tmp_path / f"imp{world}.safetensors"
        run = _torchrun(world, ["importance", str(tiny_checkpoints["llava_onevision"]), "--calib", str(path),
                                "--images", str(images), "--num-samples", "5", "--out", str(out)])
        assert run.returncode == 0, run.stderr[-2000:]
        results[world] = TokenImportance.load(out)
    for world in WORLD_SIZES[1:]:
        assert len(results[world].token_kinds) == 5
        for key, per_sample in results[1].scores.items():
            for a, b in zip(per_sample, results[world].scores[key], strict=True):
                assert float((a - b).abs().max() / a.abs().max()) <= 1e-5, (world, key)


def test_a_dead_rank_stops_the_others_with_a_clear_message(tiny_checkpoints, calib_split, tmp_path):
    """Rank 1 is killed between layers; rank 0, waiting in a collective, exits with one line."""
    path, images = calib_split
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        argv = [sys.executable, "-m", "tlq", "quantize", str(tiny_checkpoints["qwen2_vl"]), "--out",
                str(tmp_path / "out"), "--calib", str(path), "--images", str(images), "--num-samples", "4",
                "--scheme", "W4A16-g32", "--quiet", "--dist-timeout", "60"]
        procs.append(subprocess.Popen(stopping("layer-0-saved", argv) if rank == 1 else argv,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    run_file = tmp_path / "out.tlq-work" / "run.json"
    deadline = time.time() + 120
    while time.time() < deadline and '"finished_layers": 1' not in (run_file.read_text() if run_file.exists() else ""):
        assert procs[0].poll() is None, procs[0].stderr.read()[-2000:]
        time.sleep(0.2)
    assert '"finished_layers": 1' in run_file.read_text()
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = procs[0].communicate(timeout=90)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode == 2, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("tlq: error:")]
    assert len(lines) == 1 and "rank 0/2" in lines[0] and "another rank probably died" in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert time.time() - killed_at < 75
    assert not Path(tmp_path / "out").exists()
