"""One DDP rank for tests/test_ddp.py: a small model, one backward, the gradients to a file."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from switchreduce.worker.ddp import switch_allreduce_hook
from switchreduce.worker.shim import JobBinding, SwitchCommunicator, WorkerOptions


def model_and_batch(rank: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    generator = torch.Generator().manual_seed(100 + rank)
    inputs = torch.randn(16, 32, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    return model, inputs, labels


def gradients(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()


def main() -> None:
    rank, world_size, store, switch_port, bind_port, out, session = sys.argv[1:8]
    rank, world_size = int(rank), int(world_size)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    binding = JobBinding(1, rank, world_size, 16, ("127.0.0.1", int(switch_port)), int(session))
    with SwitchCommunicator(
        binding, WorkerOptions(k=256, timeout=20), bind=("127.0.0.1", int(bind_port))
    ) as comm:
        model, inputs, labels = model_and_batch(rank)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)  # several buckets
        ddp.register_comm_hook(comm, switch_allreduce_hook)
        torch.nn.functional.cross_entropy(ddp(inputs), labels).backward()
        np.save(out, gradients(model))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
