"""Stack single-sample model inputs into one padded batch (right padding, masked)."""

from __future__ import annotations

import torch

from tlq.data.conversations import Sample

# Per-token tensors [1, T] that are padded; everything else is concatenated along dim 0.
_TOKEN_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}  # token_type_ids: Gemma 3


def collate(samples: list[Sample], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels) for a batch; pixel tensors of all samples are joined along dim 0."""
    length = max(s.num_tokens for s in samples)
    batch: dict[str, list[torch.Tensor]] = {}
    labels = []
    for sample in samples:
        pad = length - sample.num_tokens
        for key, value in sample.inputs.items():
            if key in _TOKEN_KEYS:
                fill = pad_id if key == "input_ids" else 0
                value = torch.nn.functional.pad(value, (0, pad), value=fill)
            batch.setdefault(key, []).append(value)
        labels.append(torch.nn.functional.pad(sample.labels, (0, pad), value=-100))
    return {k: torch.cat(v, dim=0) for k, v in batch.items()}, torch.cat(labels, dim=0)
