"""Accuracy of a (quantized) VLM on held-out image questions, and how far it moved from the FP model.

One teacher-forced forward pass per batch gives all three numbers:
- exact match: every answer token (the words and the end-of-turn token) is the argmax given the
  correct prefix. That is exactly when greedy decoding would produce the answer, so it equals greedy
  exact match without a decoding loop;
- answer NLL: mean negative log-likelihood per answer token;
- answer KL to a reference (FP) model: mean KL(P_ref || P_model) over answer positions.
Quantized checkpoints are loaded as saved (compressed-tensors), so W*A8 activations are quantized at
run time exactly as deployed.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tlq.compat import load_quantized
from tlq.data import Sample, build_samples, load_records
from tlq.data.batching import collate
from tlq.guards import write_file_atomic
from tlq.errors import TlqError, one_line
from tlq.models import adapter_for, read_model_type
from tlq.models.weights import check_finite_parameters, check_loading_info, check_weight_files
from tlq.models.processing import load_processor


def _answer_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of labelled positions in one sequence."""
    spans, start = [], None
    flags = (labels != -100).tolist()
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


@torch.no_grad()
def score_samples(model, samples: list[Sample], pad_id: int, reference=None, batch_size: int = 16,
                  device: str | torch.device = "cpu", reference_logp: list[torch.Tensor] | None = None,
                  keep_logp: list[torch.Tensor] | None = None) -> list[dict[str, float]]:
    """Per answer: exact (0/1), nll (sum over its tokens), tokens, kl (sum, if a reference is given).

    The reference is a model run on the same batches, or `reference_logp`: its answer log-probabilities
    from an earlier call, one [tokens, vocab] tensor per answer, in answer order. `keep_logp`, a list,
    receives this model's answer log-probabilities in that form (how a benchmark runs the FP model once).
    """
    results = []
    for begin in range(0, len(samples), batch_size):
        chunk = samples[begin:begin + batch_size]
        inputs, labels = collate(chunk, pad_id)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logp = torch.log_softmax(model(**inputs).logits.float(), dim=-1).cpu()
        ref_logp = None
        if reference is not None:
            ref_logp = torch.log_softmax(reference(**inputs).logits.float(), dim=-1).cpu()
        for row in range(len(chunk)):
            for start, end in _answer_spans(labels[row]):
                # The token at position t is predicted by the logits at t - 1.
                positions = torch.arange(start - 1, end - 1)
                targets = labels[row, start:end]
                pred = logp[row, positions]
                answer = {
                    "exact": float(bool((pred.argmax(-1) == targets).all())),
                    "nll": float(-pred.gather(-1, targets[:, None]).sum()),
                    "tokens": int(end - start),
                }
                ref = ref_logp[row, positions] if ref_logp is not None else None
                if reference_logp is not None:
                    if len(results) >= len(reference_logp):
                        raise ValueError(f"{len(reference_logp)} reference answers for more answers: not the same data")
                    ref = reference_logp[len(results)]
                if ref is not None:
                    answer["kl"] = float((ref.exp() * (ref - pred)).sum())
                if keep_logp is not None:
                    keep_logp.append(pred.clone())
                results.append(answer)
    if reference_logp is not None and len(reference_logp) != len(results):
        raise ValueError(f"{len(reference_logp)} reference answers for {len(results)} answers: not the same data")
    return results


def _load_checked(model_dir: str | Path):
    """A checkpoint (FP or compressed) as saved, with a one-line error for corrupt or incomplete files."""
    check_weight_files(model_dir)
    try:
        model, info = load_quantized(model_dir, output_loading_info=True, use_safetensors=True,
                                     ignore_mismatched_sizes=True)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - config, safetensors and compressed-tensors raise many types
        raise TlqError(f"cannot load the model in {model_dir}: {one_line(exc)}") from None
    check_loading_info(model_dir, info)
    check_finite_parameters(model, model_dir)
    return model


@dataclass
class EvalSet:
    """Held-out questions turned into model inputs once; a model and its quantized copies share them."""

    records: list
    samples: list[Sample]

    @classmethod
    def load(cls, data: str | Path, images: str | Path | None, processor,
             num_samples: int | None = None, confine_images: bool = True) -> "EvalSet":
        records = load_records(data, images, confine=confine_images)
        if num_samples is not None:
            records = records[:num_samples]  # the first N, so a prefix of a split is comparable across runs
        return cls(records, build_samples(records, processor))


def evaluate(model_dir: str | Path, data: str | Path, images: str | Path | None = None,
             reference: str | Path | None = None, num_samples: int | None = None, batch_size: int = 16,
             device: str = "cpu", out: str | Path | None = None, eval_set: EvalSet | None = None,
             reference_logp: list[torch.Tensor] | None = None,
             keep_logp: list[torch.Tensor] | None = None, confine_images: bool = True,
             per_question: bool = False) -> dict[str, Any]:
    """Exact-match accuracy (overall and per question type), answer NLL and KL to `reference`; with
    `per_question`, each answer's exact, kl and tokens too (what tlq.stats compares methods on).

    `eval_set` (already built inputs), `reference_logp` (the reference's answer log-probabilities, so
    the reference model is not run again) and `keep_logp` are what `tlq bench` passes to evaluate
    many quantized copies of one model; see score_samples.
    """
    start = time.perf_counter()
    adapter_for(read_model_type(model_dir))  # a clear error for unsupported folders
    model = _load_checked(model_dir).to(device).eval()
    processor = load_processor(model_dir)
    eval_set = eval_set or EvalSet.load(data, images, processor, num_samples, confine_images)
    records = eval_set.records
    ref_model = None
    if reference is not None and reference_logp is None:
        adapter_for(read_model_type(reference))
        ref_model = _load_checked(reference).to(device).eval()
    scores = score_samples(model, eval_set.samples, processor.tokenizer.pad_token_id, ref_model, batch_size, device,
                           reference_logp, keep_logp)
    types = [t for record in records for t in record.meta.get("types", ["all"] * sum(
        m["role"] == "assistant" for m in record.messages))]
    if len(types) != len(scores):
        types = ["all"] * len(scores)
    per_type: dict[str, list[float]] = defaultdict(list)
    for kind, score in zip(types, scores):
        per_type[kind].append(score["exact"])
    tokens = sum(s["tokens"] for s in scores)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "num_questions": len(scores),
        "accuracy": sum(s["exact"] for s in scores) / max(len(scores), 1),
        "per_type": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(per_type.items())},
        "answer_nll": sum(s["nll"] for s in scores) / max(tokens, 1),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if reference is not None:
        report["reference"] = str(reference)
    if scores and "kl" in scores[0]:
        report["answer_kl"] = sum(s["kl"] for s in scores) / max(tokens, 1)
    if per_question:
        # six significant digits: the bootstrap needs no more, and a benchmark keeps thousands of these
        report["per_question"] = {key: [float(f"{s.get(key, 0.0):.6g}") for s in scores]
                                  for key in ("exact", "kl", "tokens")}
    if out is not None:
        write_file_atomic(out, json.dumps(report, indent=2) + "\n")
    return report
