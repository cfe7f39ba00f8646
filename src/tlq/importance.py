"""Token importance from one backward pass (TLQ); tlq.weighting turns it into token weights.

One forward + backward of the FP model per calibration sample, loss = cross-entropy on the answer
tokens, parameters frozen. For every quantized Linear, hooks read the gradient at that Linear's own
output y and reduce it per token:
    fisher (default)  a_t = mean_o (dL/dy_{t,o})^2   the diagonal approximation of E[(g^T dW x_t)^2]
    l2                a_t = ||dL/dy_t||_2
    gx                a_t = mean_o |dL/dy_{t,o} * y_{t,o}|
    layer_output      a_t = mean_h (dL/dh_t)^2 at the decoder layer's output, shared by its Linears
Scores are normalised per sample to mean 1, optionally clipped, and floored:
    w_t = lam + (1 - lam) * a_t
(DESIGN.md 2.1 explains why the per-Linear score and the floor matter.) The same pass records mean |g|
per token kind at each block's output Linear (the adapter's roles) for MBQ's per-modality weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tlq.activations import (activation_list, capture_layer_inputs, layer_output, next_layer_inputs,
                             run_layer, to_device)
from tlq.data import Sample
from tlq.distributed import SINGLE, Ranks
from tlq.measure import freed_memory_returned_promptly, return_freed_memory
from tlq.recipe import IMPORTANCE_SCORES
from tlq.errors import TlqError
from tlq.models import TOKEN_KIND_NAMES, ModelAdapter
from tlq.models.moe import routed_rows

SCORES = IMPORTANCE_SCORES
GRADIENT_PASSES = {"auto": None, "streamed": True, "full": False}  # name -> compute_importance(streamed=)


@dataclass
class TokenImportance:
    """Raw per-token scores: scores[f"{layer}.{linear}"][sample] is a float tensor [tokens]."""

    scores: dict[str, list[torch.Tensor]]
    abs_grad: dict[str, list[torch.Tensor]]  # mean |g| per token at the Linear's output (for MBQ)
    token_kinds: list[torch.Tensor]
    score: str = "fisher"
    loss: float = 0.0
    gradient_pass: str = ""  # "full" or "streamed": which backward produced the scores

    def save(self, path: str | Path) -> None:
        """safetensors: one concatenated tensor per Linear, sample offsets and token kinds."""
        from safetensors.torch import save_file

        lengths = torch.tensor([len(k) for k in self.token_kinds])
        tensors = {"token_kinds": torch.cat(self.token_kinds).contiguous(),
                   "sample_offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])}
        for name, per_sample in self.scores.items():
            tensors[f"score.{name}"] = torch.cat(per_sample).float().contiguous()
        for name, per_sample in self.abs_grad.items():
            tensors[f"abs_grad.{name}"] = torch.cat(per_sample).float().contiguous()
        save_file(tensors, str(path), metadata={"score": self.score, "loss": repr(self.loss),
                                                "kinds": ",".join(TOKEN_KIND_NAMES), "gradient_pass": self.gradient_pass})

    def save_atomic(self, path: str | Path) -> None:
        """`save`, whole or not at all (tlq.guards.atomic_file)."""
        from tlq.guards import atomic_file

        with atomic_file(path) as tmp:
            self.save(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "TokenImportance":
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), "pt")
        except Exception as exc:  # safetensors raises its own error types
            raise TlqError(f"cannot read importance file {path}: {exc}") from None
        with handle as f:
            meta = f.metadata() or {}
            offsets = f.get_tensor("sample_offsets").tolist()
            split = lambda t: [t[a:b] for a, b in zip(offsets[:-1], offsets[1:])]  # noqa: E731
            kinds = split(f.get_tensor("token_kinds"))
            scores = {k[len("score."):]: split(f.get_tensor(k)) for k in f.keys() if k.startswith("score.")}
            abs_grad = {k[len("abs_grad."):]: split(f.get_tensor(k)) for k in f.keys() if k.startswith("abs_grad.")}
        return cls(scores, abs_grad, kinds, meta.get("score", "fisher"), float(meta.get("loss", 0.0)),
                   meta.get("gradient_pass", ""))

    def kept_summary(self) -> dict[str, int]:
        kinds = torch.cat(self.token_kinds)
        return {name: int((kinds == i).sum()) for i, name in enumerate(TOKEN_KIND_NAMES)}


class _Recorder:
    """Hooks that turn the gradient at each quantized Linear's output (or the layer's output) into scores."""

    def __init__(self, adapter: ModelAdapter, score: str) -> None:
        self.adapter, self.score = adapter, score
        self.scores: dict[str, list[torch.Tensor]] = {}
        self.abs_grad: dict[str, list[torch.Tensor]] = {}

    def _record(self, store: dict, key: str, value: torch.Tensor) -> None:
        store.setdefault(key, []).append(value.detach().float().cpu())

    def _linear_hook(self, key: str) -> Callable:
        def hook(module, args, output):
            if not output.requires_grad:
                return
            # The gradient hook must not reach `output` itself: output -> its hooks -> this closure ->
            # output is a cycle that keeps every sample's activations alive until the garbage collector
            # happens to run (430 MB after 8 samples at 2B widths). A detached view has no hooks.
            value = output.detach() if self.score == "gx" else None
            # An MoE expert's rows are the tokens routed to it: its scores go to those positions, and
            # every other token scores 0 for it (its error there does not reach the output).
            routing = routed_rows(module)
            place = (lambda v: v[0]) if routing is None else _scatter(*routing)

            def on_grad(grad):
                g = place(grad).float()
                self._record(self.abs_grad, key, g.abs().mean(-1))
                if self.score == "fisher":
                    self._record(self.scores, key, g.pow(2).mean(-1))
                elif self.score == "l2":
                    self._record(self.scores, key, g.norm(dim=-1))
                elif self.score == "gx":
                    self._record(self.scores, key, (g * place(value).float()).abs().mean(-1))

            output.register_hook(on_grad)

        return hook

    def layer_output_grad(self, index: int, grad: torch.Tensor) -> None:
        """dL/dh at decoder layer `index`'s output, for one sample ([1, tokens, hidden])."""
        if self.score == "layer_output":
            value = grad[0].float().pow(2).mean(-1)
            for name in self.adapter.scored_modules:
                self._record(self.scores, f"{index}.{name}", value)

    def attach(self, layer: nn.Module, index: int, layer_output_hook: bool) -> list:
        handles = [layer.get_submodule(name).register_forward_hook(self._linear_hook(f"{index}.{name}"))
                   for name in self.adapter.scored_modules]
        if layer_output_hook and self.score == "layer_output":
            def hook(module, args, output):
                hidden = layer_output(output)
                if hidden.requires_grad:
                    hidden.register_hook(lambda grad: self.layer_output_grad(index, grad))

            handles.append(layer.register_forward_hook(hook))
        return handles


def _scatter(rows: torch.Tensor, tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of a routed Linear's output [n, out] placed at their token positions in [tokens, out] (zeros
    elsewhere)."""
    def place(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(tokens, values.shape[-1])
        full[rows.to(values.device)] = values.reshape(-1, values.shape[-1])
        return full

    return place


def _answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) positions, as the models' own loss."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def _check_sample(sample: Sample) -> None:
    if not (sample.labels != -100).any():
        raise TlqError("a calibration sample has no answer tokens: TLQ needs an assistant turn in each")


def _check_loss(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise TlqError("NaN loss in the importance pass: load the model in float32 or bfloat16 (--dtype)")


def _full_backward(model: nn.Module, adapter: ModelAdapter, samples: list[Sample], recorder: _Recorder,
                   device: torch.device, layers=None) -> list[float]:
    """The reference: autograd through the whole model, one sample at a time."""
    def make_leaf(module, args, output):
        return output.detach().requires_grad_(True)  # gradients flow from here; no parameter needs one

    handles = [h for index, layer in enumerate(adapter.layers(model)) for h in recorder.attach(layer, index, True)]
    handles.append(model.get_input_embeddings().register_forward_hook(make_leaf))
    model.to(device)
    losses = []
    try:
        with torch.enable_grad():
            for sample in samples:
                loss = model(**to_device(sample.inputs, device), labels=sample.labels.to(device), use_cache=False).loss
                _check_loss(loss)
                loss.backward()
                losses.append(loss.item())
                del loss
                # Each sample's autograd graph is freed into glibc's heap, which keeps most of it: untrimmed,
                # resident memory grows with every sample (benchmarks/results/cost/README.md).
                return_freed_memory()
    finally:
        for handle in handles:
            handle.remove()
        model.to("cpu")
    return losses


def _streamed_backward(model: nn.Module, adapter: ModelAdapter, samples: list[Sample], recorder: _Recorder,
                       device: torch.device, layers=None) -> list[float]:
    """The same gradients with one decoder layer on the device at a time.

    Forward layer by layer keeping each layer's inputs on the CPU; the loss at the head gives dL/dh_L;
    then from the top, each layer is recomputed on its stored inputs and the upstream gradient pushed
    through it (hooks read the Linears' output gradients on the way), giving the next upstream gradient.
    """
    from tlq.models.lazy import ResidentLayers

    layers = layers if layers is not None else ResidentLayers(model, adapter)
    captured = capture_layer_inputs(model, adapter, samples, device)
    stored = [captured.hidden]
    with torch.no_grad():
        for index in range(len(layers)):
            layer = layers.load(index, device)
            entering = captured.entering(stored[-1], index)
            outputs = activation_list(out.cpu() for _, out in run_layer(layer, entering, device))
            stored.append(next_layer_inputs(outputs, entering, index).hidden)  # the gradient passes through
            layers.release(index)
    head = nn.Sequential(model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head)).to(device)
    grads, losses = [], []
    with torch.enable_grad():
        for sample, hidden in zip(samples, stored[-1]):
            h = hidden.to(device).requires_grad_(True)
            loss = _answer_loss(head(h), sample.labels.to(device))
            _check_loss(loss)
            loss.backward()
            grads.append(h.grad.cpu())
            losses.append(loss.item())
        head.to("cpu")
        for index in reversed(range(len(layers))):
            layer = layers.load(index, device)
            handles = recorder.attach(layer, index, layer_output_hook=False)
            try:
                upstream, layer_kwargs = [], captured.entering([], index).kwargs
                for i, (hidden, kwargs) in enumerate(zip(stored[index], layer_kwargs)):
                    recorder.layer_output_grad(index, grads[i])
                    x = hidden.to(device).requires_grad_(True)
                    layer_output(layer(x, **to_device(kwargs, device))).backward(grads[i].to(device))
                    upstream.append(x.grad.cpu())
            finally:
                for handle in handles:
                    handle.remove()
                layers.release(index)
            grads, stored[index + 1] = upstream, None
            return_freed_memory()  # the layer's recomputed graphs (see _full_backward)
    return losses


def full_pass_fits(model: nn.Module, adapter: ModelAdapter, samples: list[Sample], device: torch.device,
                   layers=None) -> bool:
    """Whether autograd through the whole model (1 forward + 1 backward, no recompute) fits comfortably:
    the model on `device` plus one sample's saved activations in every layer, within half of what the
    device (or the host, for CPU) has free. Lazy layers always take the streamed pass."""
    if layers is not None and layers.lazy:
        return False
    text = model.config.get_text_config()
    tokens = max((s.num_tokens for s in samples), default=0)
    # Saved per token and layer: residual, normed input, q/k/v/o, MLP gate/up/act (float32 where upcast).
    autograd = len(adapter.layers(model)) * tokens * (6 * text.hidden_size + 3 * text.intermediate_size) * 4
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = params + autograd
    else:
        import os

        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False
        need = autograd  # the model is already in host memory
    return need <= free / 2


def compute_importance(model: nn.Module, adapter: ModelAdapter, samples: list[Sample], score: str = "fisher",
                       device: torch.device | str = "cpu", streamed: bool | None = True,
                       ranks: Ranks = SINGLE, layers=None) -> TokenImportance:
    """One forward + backward per sample of the FP model; parameters stay frozen.

    `streamed` keeps one decoder layer on the device and recomputes each layer in the backward (2
    forwards + 1 backward); False runs autograd through the whole model (1 forward + 1 backward, the
    reference the streamed pass is tested against); None chooses the full pass when it fits
    (full_pass_fits). Under torchrun `samples` are this rank's shard and the result holds every rank's
    samples, in order.
    """
    if score not in SCORES:
        raise TlqError(f"unknown importance score {score!r}: use one of {', '.join(SCORES)}")
    for sample in samples:
        _check_sample(sample)
    recorder = _Recorder(adapter, score)
    if streamed is None:
        streamed = not full_pass_fits(model, adapter, samples, torch.device(device), layers)
    backward = _streamed_backward if streamed else _full_backward
    was_training = model.training
    model.eval()
    if layers is not None and layers.lazy and not streamed:
        raise TlqError("lazy layers need the streamed importance pass")
    # Blocks of 1 MiB or more mapped on their own while the autograd graphs come and go: left to glibc's
    # default, the pass grew the heap to 11 GB of free (trimmed) address space at 2B widths and 128 samples,
    # from which every later large tensor was then carved, so that freed memory stayed resident until the
    # next trim (benchmarks/results/cost/README.md, "The importance pass's heap").
    with freed_memory_returned_promptly():
        losses = backward(model, adapter, samples, recorder, torch.device(device), layers)
    model.train(was_training)
    for key, values in recorder.scores.items():
        if len(values) != len(samples):
            raise TlqError(f"importance hook for {key} fired {len(values)} times for {len(samples)} samples")
    parts = ranks.gather_objects((recorder.scores, recorder.abs_grad, [s.token_kinds.clone() for s in samples],
                                  losses))
    merge = lambda index: {key: [t for part in parts for t in part[index][key]] for key in parts[0][index]}  # noqa: E731
    all_losses = [loss for part in parts for loss in part[3]]
    return TokenImportance(scores=merge(0), abs_grad=merge(1), token_kinds=[k for part in parts for k in part[2]],
                           score=score, loss=sum(all_losses) / max(len(all_losses), 1),
                           gradient_pass="streamed" if streamed else "full")


__all__ = ["GRADIENT_PASSES", "SCORES", "TokenImportance", "compute_importance", "full_pass_fits"]
