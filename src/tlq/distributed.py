"""Data-parallel calibration over torch.distributed ranks (torchrun; gloo on CPU, NCCL on GPU).

    torchrun --nproc-per-node 4 -m tlq quantize MODEL --out OUT --calib calib.json ...

Every rank holds the current decoder layer and a contiguous shard of the calibration samples (rank order
is sample order), so activation memory per rank is about 1/N. Whatever the algorithms need globally is
combined here: GPTQ statistics are summed onto the rank that owns a Linear's solve (owners balanced by
Hessian size) and the quantized weights broadcast from it; scale-search losses and activation statistics
are all-reduced; token importance is gathered so that the token-level set is chosen over all samples.
Only rank 0 writes the output.

A single process is `Ranks()` (rank 0 of 1): every method is then the identity, so the layer loop has one
code path. A collective that fails (a rank died, or stopped answering within the timeout) raises a
RankFailure (a TlqError) naming the rank, instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from tlq.errors import RankFailure, TlqError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0


def samples_per_chunk(count: int) -> int:
    """How many consecutive calibration samples a solver takes as one product (tlq.observe.Observer):
    up to 8, keeping at least 16 chunks so that up to 16 ranks each get whole chunks. The statistics
    then do not depend on the number of ranks, as with one product per sample."""
    return max(1, min(8, count // 16))


@dataclass
class Ranks:
    """This process's place among the calibration ranks, and the collectives the algorithms use."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: single process
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, count: int) -> range:
        """This rank's contiguous share of `count` items, in whole chunks (samples_per_chunk) while every
        rank can get one; share sizes in chunks differ by at most one."""
        unit = samples_per_chunk(count)
        if -(-count // unit) < self.size:
            unit = 1
        units = -(-count // unit)
        base, extra = divmod(units, self.size)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (1 if self.rank < extra else 0)
        return range(min(count, start * unit), min(count, stop * unit))

    def owners(self, costs: list[float]) -> list[int]:
        """Owner rank of each job: largest first onto the least loaded rank (same answer on every rank)."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            target = min(range(self.size), key=lambda r: (load[r], r))
            owner[job] = target
            load[target] += costs[job]
        return owner

    # -- collectives; identity for a single process -------------------------------------------------

    def _comm_device(self, tensor: torch.Tensor) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TlqError:
            raise
        except (RuntimeError, ValueError) as exc:  # DistBackendError and gloo/NCCL errors are RuntimeErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RankFailure(
                f"rank {self.rank}/{self.size}: {what} failed, another rank probably died or stopped responding "
                f"(timeout {self.timeout_s:.0f} s; see that rank's log): {first[:200]}"
            ) from None

    def _collective(self, what: str, tensor: torch.Tensor, op: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        if not self.distributed:
            return tensor
        device = self._comm_device(tensor)
        buffer = tensor.detach().to(device).contiguous()
        self._run(what, lambda: op(buffer))
        return buffer.to(tensor.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns a new tensor when distributed; the input itself otherwise)."""
        import torch.distributed as dist

        return self._collective("all-reduce", tensor, lambda b: dist.all_reduce(b, op=dist.ReduceOp.SUM))

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        return self._collective("all-reduce", tensor, lambda b: dist.all_reduce(b, op=dist.ReduceOp.MAX))

    def sum_to(self, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        """Sum over ranks onto `owner` (other ranks get an unspecified tensor back)."""
        import torch.distributed as dist

        return self._collective("reduce", tensor, lambda b: dist.reduce(b, dst=owner, op=dist.ReduceOp.SUM))

    def broadcast(self, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        import torch.distributed as dist

        return self._collective("broadcast", tensor, lambda b: dist.broadcast(b, src=owner))

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (our own ranks' tensors and numbers; never files)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size
        self._run("all-gather", lambda: dist.all_gather_object(gathered, value))
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._run("barrier", dist.barrier)


def ranks_from_environment(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return Ranks(timeout_s=timeout_s)
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise TlqError(f"rank {rank}: cannot join the process group ({str(exc).splitlines()[0]}): "
                           f"launch with torchrun and check MASTER_ADDR/MASTER_PORT") from None
    return Ranks(rank=rank, size=size, local_rank=local_rank, backend=backend, timeout_s=timeout_s)


def rank_device(ranks: Ranks, device: str) -> str:
    """Each rank calibrates on its own GPU: `auto`/`cuda` become cuda:LOCAL_RANK under torchrun."""
    if ranks.distributed and ranks.backend == "nccl" and device in ("auto", "cuda"):
        return f"cuda:{ranks.local_rank}"
    return device


def shutdown(ranks: Ranks) -> None:
    """End the process group once every rank has got here: a rank that tears down its gloo connections
    while another is still finishing a collective can make that rank abort (SIGABRT)."""
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            ranks.barrier()
            dist.destroy_process_group()


SINGLE = Ranks()
