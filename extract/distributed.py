"""Several processes under torchrun: process-group set-up, gathered negatives, sharding.

One process per GPU (`torchrun --nproc_per_node N`, and `--nnodes` for several machines).
Fine-tuning: each process encodes batch_size / world samples; the embeddings of all processes
are gathered, so every process computes the loss over the whole global batch (all negatives);
gradients flow through the local part only. The global batches are the ones a single process
would see with the same seed (see `shard_sampler`), so the run does not depend on the number of
GPUs. Dumping: each process encodes a contiguous slice of the videos and captions into its own
part of the cache; rank 0 merges the parts (extract/merge.py).

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op on one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size, local rank (GPU index on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (nccl on GPUs, gloo on CPUs); no-op without torchrun."""
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=60),
    )
    return info


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_with_local_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate `x` [b, ...] of every rank in rank order -> [world * b, ...].

    The other ranks' rows are constants; this rank's rows are `x` itself, so gradients flow
    through the local part. Every rank must pass the same shape.
    """
    if not info.enabled:
        return x
    if x.dtype == torch.bool:  # not every backend gathers bool tensors
        return gather_with_local_grad(x.to(torch.uint8), info).bool()
    parts = [torch.empty_like(x) for _ in range(info.world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts)


def all_gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects); [obj] on one process."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn, info: DistInfo):
    """fn() on rank 0 only; its result on every rank, or its exception raised on every rank."""
    if not info.enabled:
        return fn()
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = (type(e), str(e))
    result, error = broadcast_object((result, error), info)
    if error is not None:
        try:
            exc = error[0](error[1])
        except Exception:
            exc = RuntimeError(error[1])
        raise exc
    return result


def shard_sampler(n: int, info: DistInfo, seed: int) -> DistributedSampler:
    """A shuffling sampler that splits each epoch's permutation of range(n) over the ranks.

    torch's DistributedSampler (drop_last) gives rank r the items perm[r::world]; batched by
    batch_size / world on every rank, the union of the ranks' k-th batches is exactly
    perm[k * batch_size:(k + 1) * batch_size], the k-th batch a single process sees with the same
    seed (and the loss over a batch does not depend on its order). Call `set_epoch(e)` each epoch.
    """
    return DistributedSampler(
        range(n), num_replicas=info.world, rank=info.rank, shuffle=True, seed=seed, drop_last=True,
    )


def rank_slice(n: int, info: DistInfo) -> slice:
    """The contiguous part of range(n) this rank dumps: parts in rank order concatenate to range(n)."""
    per, extra = divmod(n, info.world)
    start = info.rank * per + min(info.rank, extra)
    return slice(start, start + per + (1 if info.rank < extra else 0))
