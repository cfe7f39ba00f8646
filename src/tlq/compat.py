"""Work-arounds for bugs in the libraries tlq writes for, each detected by behaviour, not by version.

compressed-tensors 0.20.0 packs asymmetric zero points when it compresses real tensors, but its
meta-device path (the one transformers 5.x runs before loading a checkpoint) leaves them unpacked, so
`from_pretrained` on any asymmetric pack-quantized checkpoint fails with a size mismatch on
`weight_zero_point` (vLLM has its own loader and is not affected). `fix_asymmetric_pack_loading`
makes the meta path produce the packed shape; it is a no-op where compressed-tensors already does.

transformers 5 keeps MoE experts as fused 3-D parameters and has no quantized form of them, so a
quantized MoE checkpoint, stored with one Linear per expert as vLLM reads it, does not load into its
classes; `load_quantized` builds the MoE blocks with per-expert Linears (tlq.models.moe) for such a folder.
"""

from __future__ import annotations

import functools

import torch

_applied = False


def _meta_zero_point_is_packed() -> bool:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, symmetric=False, strategy="group", group_size=8))
    state = {"weight": torch.empty(64, 16, device="meta"), "weight_scale": torch.empty(64, 2, device="meta"),
             "weight_zero_point": torch.empty(64, 2, dtype=torch.int8, device="meta")}
    out = PackedQuantizationCompressor.compress(state, scheme)
    return tuple(out["weight_zero_point"].shape) != (64, 2)


def fix_asymmetric_pack_loading() -> None:
    """Let transformers load asymmetric pack-quantized checkpoints (idempotent)."""
    global _applied
    if _applied or _meta_zero_point_is_packed():
        _applied = True
        return
    from compressed_tensors.compressors.pack_quantized import base
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    original = base.PackedQuantizationCompressor.compress.__func__

    @functools.wraps(original)
    def compress(cls, state_dict, scheme):
        zero_point = state_dict.get("weight_zero_point")
        out = original(cls, state_dict, scheme)
        weights = scheme.weights
        if (zero_point is not None and zero_point.device.type == "meta" and not weights.symmetric
                and weights.strategy in base.PACK_ZP_STRATS):
            # Same shape as packing real zero points: computed from a zero tensor on the CPU.
            packed = pack_to_int32(torch.zeros(zero_point.shape, dtype=torch.int8, device="cpu"), weights.num_bits, packed_dim=0)
            out["weight_zero_point"] = torch.empty(packed.shape, dtype=packed.dtype, device="meta")
        return out

    base.PackedQuantizationCompressor.compress = classmethod(compress)
    _applied = True


def load_quantized(model_dir, **kwargs):
    """`AutoModelForImageTextToText.from_pretrained` for a tlq output, with the work-arounds above."""
    from contextlib import nullcontext

    from transformers import AutoModelForImageTextToText

    from tlq.models import ADAPTERS, read_model_type
    from tlq.models.moe import routed_experts_as_linears

    fix_asymmetric_pack_loading()
    kwargs.setdefault("local_files_only", True)
    adapter = ADAPTERS.get(read_model_type(model_dir))
    experts = adapter.experts if adapter is not None else None
    with routed_experts_as_linears(experts) if experts is not None else nullcontext():
        return AutoModelForImageTextToText.from_pretrained(str(model_dir), **kwargs)
