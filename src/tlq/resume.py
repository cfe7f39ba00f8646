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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlq.distributed import SINGLE, Ranks
from tlq.errors import TlqError
from tlq.quant import QuantizedWeight

RUN_FILE = "run.json"


def work_dir_for(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.tlq-work"


def _atomic_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise TlqError(f"cannot read {path} ({exc}): remove the work directory {path.parent} and rerun") from None


class WorkDir:
    """Per-layer results and activations of one run, on disk."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], ranks: Ranks = SINGLE) -> None:
        self.path, self.fingerprint, self.ranks = Path(path), fingerprint, ranks
        self.finished = 0

    def open(self) -> int:
        """Create the directory or check that it belongs to this run; returns the number of finished layers."""
        run_file = self.path / RUN_FILE
        if run_file.exists():
            try:
                state = json.loads(run_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise TlqError(f"cannot read {run_file} ({exc}): remove {self.path} and rerun") from None
            if state.get("fingerprint") != self.fingerprint:
                changed = sorted(k for k in set(self.fingerprint) | set(state.get("fingerprint", {}))
                                 if self.fingerprint.get(k) != state.get("fingerprint", {}).get(k))
                raise TlqError(f"work directory {self.path} belongs to a different run (differs in {', '.join(changed)}): "
                               f"rerun the same command to resume it, or remove it to start over")
            self.finished = int(state.get("finished_layers", 0))
        self.ranks.barrier()  # every rank has read the state before rank 0 may write it
        if self.ranks.main and not run_file.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            _atomic_json(run_file, {"fingerprint": self.fingerprint, "finished_layers": 0})
        self.ranks.barrier()
        return self.finished

    # -- importance (rank 0 writes; every rank reads) ------------------------------------------------

    @property
    def importance_path(self) -> Path:
        return self.path / "importance.safetensors"

    # -- layers ----------------------------------------------------------------------------------------

    def _layer_path(self, index: int) -> Path:
        return self.path / f"layer_{index:05d}.safetensors"

    def _inputs_path(self, index: int, rank: int) -> Path:
        return self.path / f"inputs_{index:05d}.rank{rank}.safetensors"

    def save_layer(self, index: int, layer: nn.Module, quantized: dict[str, QuantizedWeight], report: dict,
                   next_hidden: list[torch.Tensor], next_fp: list[torch.Tensor] | None) -> None:
        """Record layer `index` as finished, with the inputs of layer index + 1."""
        if self.ranks.main:
            tensors = {f"state.{k}": v for k, v in layer.state_dict().items()}
            for name, q in quantized.items():  # the weight itself is the layer state's (fake-quantized) weight
                tensors.update({f"grid.{name}.scale": q.scale, f"grid.{name}.zero_point": q.zero_point})
            _atomic_tensors(self._layer_path(index), tensors, {"report": json.dumps(report)})
        hidden = {f"hidden.{i}": h for i, h in enumerate(next_hidden)}
        hidden.update({f"fp.{i}": h for i, h in enumerate(next_fp or [])})
        _atomic_tensors(self._inputs_path(index + 1, self.ranks.rank), hidden)
        self.ranks.barrier()
        if self.ranks.main:
            _atomic_json(self.path / RUN_FILE, {"fingerprint": self.fingerprint, "finished_layers": index + 1})
        self.ranks.barrier()
        self._inputs_path(index, self.ranks.rank).unlink(missing_ok=True)
        self.finished = index + 1

    def layer_state(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight], dict]:
        """Finished layer `index`: its state dict, its Linears' grids (full names) and its report."""
        tensors, meta = _load_tensors(self._layer_path(index))
        state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        names = {k[len("grid."):].rsplit(".", 1)[0] for k in tensors if k.startswith("grid.")}
        weights = {k[:-len(".weight")]: v for k, v in state.items() if k.endswith(".weight")}

        def weight_of(name: str) -> torch.Tensor:  # full module name -> the layer's own weight
            return next(v for rel, v in weights.items() if name.endswith("." + rel))

        quantized = {name: QuantizedWeight(weight=weight_of(name), scale=tensors[f"grid.{name}.scale"],
                                           zero_point=tensors[f"grid.{name}.zero_point"]) for name in sorted(names)}
        return state, quantized, json.loads(meta.get("report", "{}"))

    def load_layer(self, index: int, layer: nn.Module | None) -> tuple[dict[str, QuantizedWeight], dict]:
        """Put finished layer `index` back into `layer` (if given); returns its grids and its report."""
        state, quantized, report = self.layer_state(index)
        if layer is None:
            return {}, report
        layer.load_state_dict(state)
        return quantized, report

    def load_inputs(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        tensors, _ = _load_tensors(self._inputs_path(index, self.ranks.rank))
        hidden = [tensors[f"hidden.{i}"] for i in range(sum(k.startswith("hidden.") for k in tensors))]
        fp = [tensors[f"fp.{i}"] for i in range(sum(k.startswith("fp.") for k in tensors))]
        return hidden, (fp or None)
