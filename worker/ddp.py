"""PyTorch DistributedDataParallel on top of the switch: a communication hook.

DDP hands the hook each gradient bucket as one flat tensor; the hook sums it
over the ranks through the switch and divides by the world size, which is
exactly what DDP's default allreduce hook computes. torch.distributed (gloo)
is still needed for DDP's bootstrap: rendezvous, the initial parameter
broadcast and barriers. Buckets come in the same order on every rank, which
is what the switch's slot rounds rely on.

    comm = SwitchCommunicator(JobBinding(...))
    model = DistributedDataParallel(model)
    model.register_comm_hook(comm, switch_allreduce_hook)
"""

# No "from __future__ import annotations": DDP checks the hook's annotations at runtime.
import torch
import torch.distributed as dist

from switchreduce.worker.shim import SwitchCommunicator


def switch_allreduce_hook(
    comm: SwitchCommunicator, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over all ranks through the switch.

    Runs to completion before returning (the window is driven from this
    thread), so the returned future is already done. float32 gradients are
    quantized per block as in worker.quantize, whose error bound applies to
    the sum before the division.
    """
    total = comm.allreduce(bucket.buffer())
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(total.div_(comm.binding.world_size))
    return future
