"""One DDP rank for tests/test_ddp.py: a small model's gradients, with gloo and through the switch.

The rank runs a few backward passes with DDP's own (gloo) allreduce, then
the same with the switch's hook, and saves both last gradients and the
bucket sizes DDP used (it cuts its buckets after the first pass).
"""

from __future__ import annotations

import sys
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from switchreduce.worker import ddp as hooks
from switchreduce.worker.shim import JobBinding, SwitchCommunicator, WorkerOptions

PASSES = 3
BUCKET_CAP_MB = 0.01  # 10 KB: the model's 44 KB of gradients make three buckets


def model_and_batch(rank: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    generator = torch.Generator().manual_seed(100 + rank)
    inputs = torch.randn(16, 32, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    return model, inputs, labels


def gradients(model: torch.nn.Module) -> np.ndarray:
    # every parameter has a gradient once a backward pass has run
    return torch.cat([cast(torch.Tensor, p.grad).reshape(-1) for p in model.parameters()]).numpy()


def backward_passes(ddp: DistributedDataParallel, rank: int) -> tuple[np.ndarray, list[int]]:
    """The gradients of the last of PASSES backward passes (no step: the same each time)."""
    _, inputs, labels = model_and_batch(rank)
    for _ in range(PASSES):
        ddp.zero_grad()
        torch.nn.functional.cross_entropy(ddp(inputs), labels).backward()
    sizes = ddp._get_ddp_logging_data()["rebuilt_bucket_sizes"]  # cut after the first pass
    return gradients(ddp.module), [int(size) for size in str(sizes).split(", ")]


def main() -> None:
    rank_arg, world_size_arg, store, switch_port, bind_port, out, session, hook = sys.argv[1:9]
    rank, world_size = int(rank_arg), int(world_size_arg)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    gloo = DistributedDataParallel(model_and_batch(rank)[0], bucket_cap_mb=BUCKET_CAP_MB)
    gloo_gradients, _ = backward_passes(gloo, rank)
    binding = JobBinding(1, rank, world_size, 16, ("127.0.0.1", int(switch_port)), int(session))
    with SwitchCommunicator(
        binding, WorkerOptions(k=256, timeout=20), bind=("127.0.0.1", int(bind_port))
    ) as comm:
        switch = DistributedDataParallel(model_and_batch(rank)[0], bucket_cap_mb=BUCKET_CAP_MB)
        switch.register_comm_hook(comm, getattr(hooks, hook))
        switch_gradients, bucket_sizes = backward_passes(switch, rank)
    np.savez(out, gloo=gloo_gradients, switch=switch_gradients, bucket_sizes=bucket_sizes)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
