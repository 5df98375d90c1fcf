"""Process-group setup for one plain process, `torchrun` on one node, or multi-node `torchrun` (c10d).

- One plain process (no `RANK` in the environment): a world of 1 is set up here with gloo on a free
  local port, so the same code path (DeepSpeed engine, collectives, checkpoints) runs everywhere.
- Under torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR/PORT` come from the launcher.
- Backend: NCCL with CUDA, gloo otherwise.
- A dead rank: every collective has a timeout (`train.dist_timeout_s`), so the survivors fail with an
  error instead of hanging. Under torchrun the elastic agent also sends the remaining workers of a
  node SIGTERM as soon as one exits non-zero: a stop signal (lmstack.train.stop), which they only note
  while blocked in a collective with the dead rank, so the agent kills them after its
  `--shutdown-timeout` (30 s; launch/torchrun.sh: STOP_GRACE_S); the other nodes' agents see the
  rendezvous close.
- DeepSpeed on CPU: its shared-memory communication op is disabled before `init_distributed`, so that
  no C++ extension is JIT-compiled (gloo is used directly).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> DistInfo:
    """Join (or create) the process group; returns this process's place in it."""
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
        )
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
        # Fail a stuck NCCL collective after the timeout rather than blocking forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        device, backend = torch.device("cpu"), "gloo"
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_gather_object(obj):
    """A list with every rank's `obj` (rank order)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_int(value: int, op: str) -> int:
    """Collective: the "min" or "max" of an integer over all ranks (on the backend's device: NCCL
    reduces CUDA tensors only)."""
    import torch.distributed as dist

    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
