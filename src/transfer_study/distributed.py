"""Training one cell on several processes with DistributedDataParallel (DDP), launched by torchrun:

    torchrun --nproc_per_node 2 -m transfer_study.cli train --arch resnet18 --condition scratch

One process per GPU (NCCL), or several CPU processes (gloo). Every rank draws the same shuffled
order of the training rows for an epoch (same seed) and cuts it into the same global batches of
`train.batch_size` rows; rank r takes rows r, r + world, r + 2·world, ... of each. So the
effective batch is `train.batch_size`, and the averaged gradient equals the single-process one
(`loss_weight` corrects for a last batch that does not split evenly).

BatchNorm stays plain: each rank normalises with the statistics of its own batch_size / world
images, as in torchvision's DDP recipes without --sync-bn. Results therefore differ slightly from a
single process for networks that train BatchNorm layers (scratch, finetune); a frozen backbone
keeps ImageNet's statistics and gives the single-process result.

Only rank 0 validates, writes files and talks to MLflow. Across nodes, torchrun runs on every node
with a c10d rendezvous (README, "Team setup"); each node needs the project at the same commit with
the same data, builds its own image store, and only rank 0's node gets the run folder. A process or
node that dies ends the job on every other rank with a UserError (the collective it was in fails),
and rerunning the same command on every node resumes from the last finished epoch.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import LaunchEnv, UserError

# Rank 0 validates, checkpoints and logs (retrying MLflow for up to ~2 min) while the others wait
# in the next collective; the default timeout (10 min for NCCL) is too short for a large model.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's rank among `size` training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, preferred: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU under DDP, else `preferred`."""
        if not self.distributed or preferred.type == "cpu":
            return preferred
        if preferred.type == "cuda":
            return torch.device("cuda", self.local_rank)
        raise UserError(f"multi-process training runs on CUDA (NCCL) or CPU (gloo), not {preferred.type}; "
                        "run a single process (without torchrun)")

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0 first and on the others after it: for files rank 0 creates
        (the image store, downloaded weights) and the others then only read."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum of `values` over all ranks (the values themselves in one process)."""
        if not self.distributed:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        return totals.tolist()

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`module` under DDP, which averages its gradients across ranks; `module` itself in one process."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)


SINGLE_PROCESS = World()


@contextmanager
def process_group(env: LaunchEnv) -> Iterator[World]:
    """Join the torchrun process group for the duration of the body (nothing to join in one process)."""
    world = World(env.rank, env.world_size, env.local_rank)
    if not world.distributed:
        yield world
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    # init_method env:// reads MASTER_ADDR and MASTER_PORT, which torchrun sets.
    torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                         timeout=COLLECTIVE_TIMEOUT)
    try:
        yield world
    except (RuntimeError, torch.distributed.DistError) as exc:
        if not lost_a_process(exc):
            raise
        raise UserError(f"rank {world.rank} of {world.size}: the torchrun job lost a process ({_first_line(exc)}); "
                        "a node or process of the job stopped (its own log says why); rerun the same torchrun "
                        "command on every node: training resumes from the last finished epoch") from None
    finally:
        torch.distributed.destroy_process_group()


# What gloo says when a peer's connection drops; NCCL raises DistError subclasses.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo/transport")


def lost_a_process(exc: BaseException) -> bool:
    """Whether a collective failed because another process of the job is gone (not a bug here)."""
    return isinstance(exc, torch.distributed.DistError) or any(text in str(exc) for text in _PEER_GONE)


def _first_line(exc: BaseException) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:300]


def shard_batches(order: Sequence[int], batch_size: int, world: World) -> list[list[int]]:
    """Cut `order` into global batches of batch_size and give this rank rows rank::size of each.

    A last batch with fewer rows than ranks is dropped: every rank must take part in every step,
    and a rank without rows has nothing to step on (at most size - 1 rows an epoch, only under DDP).
    """
    shards = []
    for start in range(0, len(order), batch_size):
        batch = list(order[start:start + batch_size])
        if len(batch) < world.size:
            break
        shards.append(batch[world.rank::world.size])
    return shards


def loss_weight(shard_rows: int, global_rows: int, world: World) -> float:
    """Factor on a rank's mean loss so that DDP's average of the gradients over ranks is the
    gradient of the mean loss over the whole global batch (1 when the batch splits evenly)."""
    return world.size * shard_rows / global_rows
