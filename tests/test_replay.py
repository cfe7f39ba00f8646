import pytest
import torch

from tlq import replay
from tlq.replay import PackedOutputs


def test_packed_outputs_read_back_exactly_and_free_each_buffer_once_all_its_samples_are_released(monkeypatch):
    """Samples are packed into buffers of at most BUFFER_BYTES (one sample may exceed it alone); each reads
    back as the tensor appended, and a buffer is freed exactly when the last of its samples is released."""
    monkeypatch.setattr(replay, "BUFFER_BYTES", 4 * 8 * 4)  # 4 rows of 8 float32 per buffer
    rows = [3, 1, 5, 2, 2]  # buffers: [0, 1], [2] (alone, larger than a buffer), [3, 4]
    tensors = [torch.randn(1, r, 8) for r in rows]
    packed = PackedOutputs(rows)
    for t in tensors:
        packed.append(t)
    assert len(packed) == len(rows) and len(packed.buffers) == 3
    assert all(torch.equal(packed[i], t) for i, t in enumerate(tensors))
    packed.release(1)
    assert len(packed.buffers) == 3  # sample 0 still reads buffer 0
    packed.release(0)
    assert len(packed.buffers) == 2
    assert torch.equal(packed[2], tensors[2]) and torch.equal(packed[4], tensors[4])
    for i in (2, 3, 4):
        packed.release(i)
    assert not packed.buffers


def test_packed_outputs_refuse_an_output_whose_length_is_not_the_layer_inputs():
    packed = PackedOutputs([3, 2])
    packed.append(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="sample 1: 5 output rows where the layer input has 2"):
        packed.append(torch.zeros(1, 5, 4))
