"""PyTorch DistributedDataParallel on top of the switch: communication hooks.

DDP hands a hook each gradient bucket as one flat tensor; the hook sums it
over the ranks through the switch and divides by the world size, which is
exactly what DDP's default allreduce hook computes (by the quorum, in a job
whose rounds a quorum of the ranks completes, unless error feedback keeps the
late ranks' gradients: SwitchCommunicator.averaged_over). torch.distributed (gloo)
is still needed for DDP's bootstrap: rendezvous, the initial parameter
broadcast and barriers. Buckets come in the same order on every rank, which
is what the switch's slot rounds rely on.

    comm = SwitchCommunicator(JobBinding(...))
    model = DistributedDataParallel(model)
    model.register_comm_hook(comm, switch_allreduce_hook)

``switch_allreduce_hook`` returns at once and the bucket travels while the
backward pass computes the next ones, as gloo's do; DDP waits for every
bucket's future before the gradients are used, and leaves a bucket's buffer
alone until then. ``switch_blocking_hook`` sums each bucket before the
backward pass goes on: the baseline the overlap is measured against.
``local_gradients_hook`` sums nothing, to time the compute alone.
"""

# No "from __future__ import annotations": DDP checks the hooks' annotations at runtime.
import torch
import torch.distributed as dist

from switchreduce.worker.shim import SwitchCommunicator


def average(comm: SwitchCommunicator, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """The average of ``tensor`` over all ranks, summed in the communicator's thread.

    float32 gradients are quantized per block as in worker.quantize, whose
    error bound applies to the sum before the division.
    """
    divisor = comm.averaged_over  # the world size, or the job's quorum
    return comm.allreduce_async(tensor).then(lambda summed: summed.value().div_(divisor))


def average_now(
    comm: SwitchCommunicator, tensor: torch.Tensor
) -> torch.futures.Future[torch.Tensor]:
    """:func:`average` run to completion in this thread: the future is done on return."""
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(comm.allreduce(tensor).div_(comm.averaged_over))
    return future


def switch_allreduce_hook(
    comm: SwitchCommunicator, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over all ranks through the switch, overlapped with the backward pass."""
    _mark_step(comm, bucket)
    return average(comm, bucket.buffer())


def switch_blocking_hook(
    comm: SwitchCommunicator, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over all ranks through the switch before the backward pass goes on."""
    _mark_step(comm, bucket)
    return average_now(comm, bucket.buffer())


def _mark_step(comm: SwitchCommunicator, bucket: dist.GradBucket) -> None:
    """A backward pass's first bucket begins a step (error feedback's call positions)."""
    if bucket.index() == 0:  # DDP hands its buckets over in index order
        comm.step()


def local_gradients_hook(
    buckets: dict[int, torch.Tensor], bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Sum nothing: each rank keeps its own gradients (a training's compute, timed alone).

    ``buckets`` holds the last backward pass's buckets by index: DDP's own
    buffers, which a backward pass sums, to be summed without one.
    """
    if bucket.index() == 0:  # DDP hands its buckets over in index order
        buckets.clear()
    buckets[bucket.index()] = bucket.buffer()
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future
