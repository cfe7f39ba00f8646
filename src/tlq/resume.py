"""The work directory that lets a killed calibration continue from its last finished layer.

    OUT.tlq-work/
        run.json                      what the run is (recipe, model, data hash, ranks) and how far it got
        importance.safetensors        the token importance of the FP model (the one backward pass)
        layer_00003.safetensors       layer 3 as calibrated: its state (fake-quantized Linears, rescaled
                                      norms), the Linears' scales and zero points, and its report
        inputs_00004.rank0.safetensors  the next layer's inputs on each rank's samples (+ FP-path stream)

After layer l: the layer file, then every rank's inputs for l + 1, then (rank 0, after a barrier)
run.json says l + 1 layers are done, and only then are the inputs for l removed. A kill at any point
leaves a consistent state; rerunning the same command skips the finished layers and reproduces the
uninterrupted result bit for bit (tensors are stored exactly; every random draw is seeded per layer).
Everything is safetensors + JSON: nothing in the work directory is ever unpickled.

The work directory is not trusted: run.json records the sha256 of every file the finished state rests
on, and a file is read back only when its bytes still hash to that (a flipped bit, a file swapped or
truncated after a crash is refused with its path), its tensors are finite, and run.json's own fields
have the types and ranges a run writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlq.activations import activation_list
from tlq.callbacks import FinishedLayer, LayerCallback, LoopStart
from tlq.distributed import SINGLE, Ranks
from tlq.errors import TlqError
from tlq.guards import atomic_file
from tlq.quant import QuantizedWeight

RUN_FILE = "run.json"


def work_dir_for(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.tlq-work"


def _writing(path: Path):
    """A work file written whole or not at all; a failed write is one line naming it."""
    return atomic_file(path, "the work file ")


def _atomic_json(path: Path, value: dict) -> None:
    with _writing(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file whole (temporary sibling + rename); returns its sha256."""
    from safetensors.torch import save_file

    with _writing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        digest = _sha256(tmp)
    return digest


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors raises its own error types
        raise _refuse(path, "is not a readable safetensors file") from None


def _refuse(path: Path, problem: str) -> TlqError:
    return TlqError(f"work file {path} {problem}: remove the work directory {path.parent} and rerun "
                    f"(or pass --no-resume)")


log = logging.getLogger(__name__)


class WorkDir(LayerCallback):
    """Per-layer results and activations of one run, on disk. As a callback of the layer loop it restores
    the layers finished before a crash (`resume`) and saves each layer as it finishes."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], ranks: Ranks = SINGLE) -> None:
        self.path, self.fingerprint, self.ranks = Path(path), fingerprint, ranks
        self.finished = 0
        self.digests: dict[str, str] = {}  # file name -> sha256, for every file the state rests on
        self._verified: set[str] = set()  # checked against its digest in this process

    def open(self, num_layers: int) -> int:
        """Create the directory or check that it belongs to this run; returns the number of finished layers."""
        run_file = self.path / RUN_FILE
        if run_file.exists():
            state = self._read_state(run_file, num_layers)
            if state["fingerprint"] != self.fingerprint:
                changed = sorted(k for k in set(self.fingerprint) | set(state["fingerprint"])
                                 if self.fingerprint.get(k) != state["fingerprint"].get(k))
                raise TlqError(f"work directory {self.path} belongs to a different run (differs in {', '.join(changed)}): "
                               f"rerun the same command to resume it, or remove it to start over")
            self.finished, self.digests = state["finished_layers"], dict(state.get("digests", {}))
            self._check_finished_state()
        elif self.path.exists() and any(self.path.iterdir()):
            raise TlqError(f"work directory {self.path} has files but no {RUN_FILE}: remove it and rerun")
        self.ranks.barrier()  # every rank has read the state before rank 0 may write it
        if self.ranks.main and not run_file.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_state()
        self.ranks.barrier()
        return self.finished

    def _read_state(self, run_file: Path, num_layers: int) -> dict[str, Any]:
        try:
            state = json.loads(run_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise _refuse(run_file, f"cannot be read ({type(exc).__name__})") from None
        finished = state.get("finished_layers") if isinstance(state, dict) else None
        digests = state.get("digests", {}) if isinstance(state, dict) else None
        if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict):
            raise _refuse(run_file, "is not a tlq run record")
        if type(finished) is not int or not 0 <= finished <= num_layers:
            raise _refuse(run_file, f"says finished_layers={finished!r}, not a layer count in 0..{num_layers}")
        if not isinstance(digests, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
            raise _refuse(run_file, "has no valid digests")
        return state

    def _check_finished_state(self) -> None:
        """Before anything is written: every file the finished layers rest on is there and unchanged."""
        if self.finished == 0:
            return
        for path in [self._layer_path(i) for i in range(self.finished)] + [self._inputs_path(self.finished, self.ranks.rank)]:
            self._check(path)
        if self.importance_path.name in self.digests:
            self._check(self.importance_path)

    def _check(self, path: Path) -> None:
        if path.name in self._verified:
            return
        expected = self.digests.get(path.name)
        if expected is None:
            raise _refuse(path, "is not recorded in run.json")
        if not path.is_file():
            raise _refuse(path, "is missing")
        if _sha256(path) != expected:
            raise _refuse(path, "changed since it was written (sha256 differs)")
        self._verified.add(path.name)

    def _write_state(self) -> None:
        _atomic_json(self.path / RUN_FILE, {"fingerprint": self.fingerprint, "finished_layers": self.finished,
                                            "digests": dict(sorted(self.digests.items()))})

    def _read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A work file's tensors, only if its bytes are the ones recorded and its values finite."""
        self._check(path)
        tensors, meta = _load_tensors(path)
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise _refuse(path, f"holds NaN or inf in {key}")
        return tensors, meta

    # -- importance (rank 0 writes; every rank reads) ------------------------------------------------

    @property
    def importance_path(self) -> Path:
        return self.path / "importance.safetensors"

    def saved_importance(self):
        """The importance pass of an earlier attempt of this run, if it was recorded whole (else None)."""
        from tlq.importance import TokenImportance

        if self.importance_path.name not in self.digests:
            return None
        self._read(self.importance_path)  # digest and finiteness
        return TokenImportance.load(self.importance_path)

    def keep_importance(self, importance) -> None:
        """Rank 0 saves the importance pass and records it; every rank then knows its digest."""
        digest = None
        if self.ranks.main:
            with _writing(self.importance_path) as tmp:
                importance.save(tmp)
                digest = _sha256(tmp)
        self.digests[self.importance_path.name] = self.ranks.gather_objects(digest)[0]
        if self.ranks.main:
            self._write_state()
        self.ranks.barrier()

    # -- layers ----------------------------------------------------------------------------------------

    def _layer_path(self, index: int) -> Path:
        return self.path / f"layer_{index:05d}.safetensors"

    def _inputs_path(self, index: int, rank: int) -> Path:
        return self.path / f"inputs_{index:05d}.rank{rank}.safetensors"

    def save_layer(self, index: int, layer: nn.Module, quantized: dict[str, QuantizedWeight], report: dict,
                   next_hidden: list[torch.Tensor], next_fp: list[torch.Tensor] | None) -> None:
        """Record layer `index` as finished, with the inputs of layer index + 1."""
        written: dict[str, str] = {}
        if self.ranks.main:
            tensors = {f"state.{k}": v for k, v in layer.state_dict().items()}
            for name, q in quantized.items():  # the weight itself is the layer state's (fake-quantized) weight
                tensors.update({f"grid.{name}.scale": q.scale, f"grid.{name}.zero_point": q.zero_point})
            path = self._layer_path(index)
            written[path.name] = _atomic_tensors(path, tensors, {"report": json.dumps(report)})
        hidden = {f"hidden.{i}": h for i, h in enumerate(next_hidden)}
        hidden.update({f"fp.{i}": h for i, h in enumerate(next_fp or [])})
        path = self._inputs_path(index + 1, self.ranks.rank)
        written[path.name] = _atomic_tensors(path, hidden)
        for part in self.ranks.gather_objects(written):  # also a barrier: every rank's files are written
            self.digests.update(part)
        for rank in range(self.ranks.size):
            self.digests.pop(self._inputs_path(index, rank).name, None)
        self.finished = index + 1
        if self.ranks.main:
            self._write_state()
        self.ranks.barrier()
        self._inputs_path(index, self.ranks.rank).unlink(missing_ok=True)

    def resume(self, start: LoopStart, layers, result) -> LoopStart:
        """Layers finished before a crash are put back into `layers` and `result`, not recomputed; the
        loop starts after them, on the inputs saved for the first unfinished layer."""
        from tlq.engine import LayerReport

        for index in range(self.finished):
            quantized, report = self.load_layer(index, layers.resident(index))
            layers.keep(result.quantized, quantized)
            result.layers.append(LayerReport(**{**report, "resumed": True}))
        if not self.finished:
            return start
        hidden, fp_hidden = self.load_inputs(self.finished)
        log.info("resumed from %s: layers 0..%d were finished", self.path, self.finished - 1)
        streams = start.streams.entering(activation_list(hidden), activation_list(fp_hidden or []), self.finished)
        return LoopStart(self.finished, streams)

    def layer_finished(self, finished: FinishedLayer) -> None:
        with finished.clock("save"):
            fp = finished.streams.separate_fp
            self.save_layer(finished.index, finished.layer, finished.quantized, dataclasses.asdict(finished.report),
                            finished.streams.quantized.hidden, fp.hidden if fp is not None else None)

    def layer_state(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight], dict]:
        """Finished layer `index`: its state dict, its Linears' grids (full names) and its report."""
        path = self._layer_path(index)
        tensors, meta = self._read(path)
        state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        names = {k[len("grid."):].rsplit(".", 1)[0] for k in tensors if k.startswith("grid.")}
        weights = {k[:-len(".weight")]: v for k, v in state.items() if k.endswith(".weight")}

        def weight_of(name: str) -> torch.Tensor:  # full module name -> the layer's own weight
            return next(v for rel, v in weights.items() if name.endswith("." + rel))

        try:
            quantized = {name: QuantizedWeight(weight=weight_of(name), scale=tensors[f"grid.{name}.scale"],
                                               zero_point=tensors[f"grid.{name}.zero_point"]) for name in sorted(names)}
            report = json.loads(meta.get("report", "{}"))
        except (KeyError, StopIteration, ValueError):
            raise _refuse(path, "does not hold a calibrated layer") from None
        return state, quantized, report

    def load_layer(self, index: int, layer: nn.Module | None) -> tuple[dict[str, QuantizedWeight], dict]:
        """Put finished layer `index` back into `layer` (if given); returns its grids and its report."""
        state, quantized, report = self.layer_state(index)
        if layer is None:
            return {}, report
        try:
            layer.load_state_dict(state)
        except RuntimeError:
            raise _refuse(self._layer_path(index), "does not fit this model's layer (names or shapes)") from None
        return quantized, report

    def load_inputs(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        tensors, _ = self._read(self._inputs_path(index, self.ranks.rank))
        hidden = [tensors[f"hidden.{i}"] for i in range(sum(k.startswith("hidden.") for k in tensors))]
        fp = [tensors[f"fp.{i}"] for i in range(sum(k.startswith("fp.") for k in tensors))]
        return hidden, (fp or None)
