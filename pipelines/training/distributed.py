"""torch.distributed set-up: the same code runs as one plain process and under ``torchrun``
(gloo on CPU, NCCL on GPU), on one machine or many nodes. Nothing here is a home-made engine:
it reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and calls
``torch.distributed.init_process_group``."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: int = 1800, *, threads: int | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun; otherwise a single process.

    ``device``: ``auto`` (this rank's GPU when there is one, else CPU), ``cpu`` or ``cuda``.
    ``threads``: torch intra-op threads of this process (None: torch's default)."""
    if threads:
        torch.set_num_threads(int(threads))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # torch._dynamo (which timm and torchvision import) imported after init_process_group keeps
        # the process group alive past destroy_process_group (torch 2.14); its gloo threads then
        # outlive the interpreter and can abort the process at exit. Imported first, it does not.
        importlib.import_module("torch._dynamo")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_gather_objects(obj):
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def micro_steps(model: torch.nn.Module, micro_batches: Sequence[T]) -> Iterator[T]:
    """Exact gradient accumulation: iterate ``micro_batches`` with the loop body of each inside
    ``model.no_sync()`` except the last, so DDP all-reduces the summed gradient once. The body
    backpropagates ``loss / len(micro_batches)``, which makes the gradient the big batch's::

        for views in micro_steps(ddp_model, micro):
            with precision.autocast():
                loss = compute(views)
            precision.backward(loss / len(micro))
    """
    n = len(micro_batches)
    for i, item in enumerate(micro_batches):
        with maybe_no_sync(model, skip_sync=i < n - 1):
            yield item


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool):
    """``model.no_sync()`` on DDP models for non-final accumulation micro-steps."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield
