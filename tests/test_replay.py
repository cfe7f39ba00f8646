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


def test_a_replayed_block_gets_back_the_forward_it_had():
    """Replay swaps the block's `forward` for the pass; removing it restores what was there, including an
    instance-level wrapper another library installed (accelerate's dispatch hooks do)."""
    from tlq.models.base import Block
    from tlq.replay import BlockReplay

    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Linear(4, 4)
    wrapped = layer.self_attn.forward
    layer.self_attn.forward = lambda x: wrapped(x) * 2  # a wrapper installed before calibration
    installed = layer.self_attn.forward
    replay = BlockReplay(layer, (Block("attention", "self_attn", ("self_attn",), "self_attn"),), [3])
    replay.solved(["self_attn"])
    for handle in replay.handles(torch.device("cpu")):  # records
        layer.self_attn(torch.randn(1, 3, 4))
        handle.remove()
    replay.pass_finished()
    handles = replay.handles(torch.device("cpu"))
    assert layer.self_attn.forward is not installed
    for handle in handles:
        handle.remove()
    assert layer.self_attn.forward is installed


class _Attention(torch.nn.Module):
    """A block whose output is its output Linear's (`scale` 1) or something after it (`scale` 2)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.inner, self.out, self.scale, self.calls = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), scale, 0

    def forward(self, x):
        self.calls += 1
        return self.out(self.inner(x)) * self.scale, None


@pytest.mark.parametrize(("scale", "full_runs"), [(1.0, 1), (2.0, 3)])
def test_a_block_is_computed_through_its_output_linear_only_where_that_is_exact(scale, full_runs):
    """With every Linear of a block but its output Linear solved, one pass records that Linear's inputs and
    the next computes the block as the Linear applied to them, after checking on its first sample that this
    equals the block's own output. Where it does not (the block scales its output), the block runs in full on
    every sample. Either way each sample gets exactly the block's output."""
    from tlq.models.base import Block
    from tlq.replay import BlockReplay

    layer = torch.nn.Module()
    layer.self_attn = _Attention(scale)
    xs = [torch.randn(1, 2 + i, 4) for i in range(3)]
    replay = BlockReplay(layer, (Block("attention", "self_attn", ("self_attn.inner", "self_attn.out"),
                                       "self_attn.out"),), [x.shape[1] for x in xs])
    replay.solved(["self_attn.inner"])
    with torch.no_grad():
        for record in (True, False):
            handles = replay.handles(torch.device("cpu"), record=record)
            layer.self_attn.calls = 0
            outputs = []
            for i, x in enumerate(xs):
                replay.set_sample(i)
                outputs.append(layer.self_attn(x)[0])
            for handle in handles:
                handle.remove()
            replay.pass_finished()
        assert layer.self_attn.calls == full_runs
        assert all(torch.equal(out, _Attention.forward(layer.self_attn, x)[0]) for out, x in zip(outputs, xs))
