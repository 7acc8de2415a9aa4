"""Allreduce backends by name: the switch, gloo, and whatever plugs in later.

As in ray.util.collective, a backend is a class registered under a name;
the worker CLI, training and the bench open one by name and use it through
:class:`Backend` alone. A new backend (another transport, a compressed
baseline) is a subclass with ``@register``; nothing that uses backends
changes.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from switchreduce import wire
from switchreduce.worker import quantize as q
from switchreduce.worker.engine import EngineName
from switchreduce.worker.errors import WorkerError
from switchreduce.worker.registration import join
from switchreduce.worker.shim import SwitchCommunicator, WorkerOptions
from switchreduce.worker.window import DEFAULT_MIN_RTO

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GroupOptions:
    """Who this rank is and how to reach its peers, for any backend."""

    rank: int
    world_size: int
    timeout: float = 10.0
    #: The switch backend: the job, and either the switch (a static job) or a controller.
    job_id: int = 1
    k: int = wire.DEFAULT_K
    slots: int = 64
    switch: tuple[str, int] | None = None
    controller: str | None = None
    bind: tuple[str, int] = ("0.0.0.0", 0)
    precision_bits: int = q.MAX_BITS
    #: Bits per float element on the wire (32, 16 or 8); a controller admits the job's.
    lane_bits: int = q.MAX_BITS
    #: The switch job's quorum: ranks whose contributions complete a round (None: all).
    quorum: int | None = None
    #: Rounding to the grid, its noise's seed, and error feedback (worker.shim.WorkerOptions).
    rounding: q.Rounding = "nearest"
    rounding_seed: int = 0
    error_feedback: bool = False
    min_rto: float = DEFAULT_MIN_RTO
    #: The switch backend's window: compiled, or python (worker/engine.py).
    engine: EngineName = "compiled"
    #: DDP: each bucket is summed while the backward pass goes on (False: before it goes on).
    overlap: bool = True
    #: gloo-powersgd: PowerSGD's rank, and the iterations of plain allreduce before it.
    powersgd_rank: int = 1
    powersgd_warmup: int = 10
    #: gloo: rank 0's HOST:PORT; None when torch.distributed is set up already (torchrun).
    master: tuple[str, int] | None = None


class Backend(ABC):
    """One rank's allreduce; use as a context manager (``close`` tears it down)."""

    name: ClassVar[str]

    @abstractmethod
    def allreduce(self, array: np.ndarray) -> np.ndarray:
        """The sum over all ranks of a numpy array, same shape and dtype."""

    @abstractmethod
    def attach(self, ddp: Any) -> None:
        """Make ``ddp`` (DistributedDataParallel) sum its gradients through this backend."""

    @abstractmethod
    def average_buckets(self, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
        """What :meth:`attach` makes DDP do with a backward pass's gradient buckets, without
        the backward pass: each one's average over the ranks, in order (the inputs are
        left as they are). Timing it is timing the training's communication alone."""

    def stats(self) -> dict[str, int]:
        """Packet statistics, where the backend keeps any."""
        return {}

    @property
    def bytes_sent(self) -> int | None:
        """Payload bytes this rank has sent, where the backend counts them."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    BACKENDS[cls.name] = cls
    return cls


def open_backend(name: str, options: GroupOptions) -> Backend:
    """The backend registered as ``name``, set up for this rank."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"no allreduce backend {name!r}; there are {sorted(BACKENDS)}") from None
    return cls(options)  # type: ignore[call-arg]


@register
class SwitchBackend(Backend):
    """Sums through the switch: joins the job (controller or static), then streams."""

    name = "switch"

    def __init__(self, options: GroupOptions) -> None:
        self._stack = ExitStack()
        try:
            sock = self._stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind(options.bind)
            o = options
            # entered before the communicator, so it outlives it: a rank leaves once done
            membership = self._stack.enter_context(
                join(
                    sock,
                    o.job_id,
                    o.rank,
                    o.world_size,
                    o.k,
                    switch=o.switch,
                    slots=o.slots,
                    controller=o.controller,
                    timeout=o.timeout * 6,
                    lane_bits=o.lane_bits,
                    quorum=o.quorum,
                )
            )
            worker_options = WorkerOptions(
                k=o.k,
                timeout=o.timeout,
                precision_bits=o.precision_bits,
                lane_bits=o.lane_bits,
                rounding=o.rounding,
                rounding_seed=o.rounding_seed,
                error_feedback=o.error_feedback,
                min_rto=o.min_rto,
                engine=o.engine,
            )
            self.comm = self._stack.enter_context(
                SwitchCommunicator(membership.binding, worker_options, sock)
            )
        except BaseException:
            self._stack.close()
            raise
        self.overlap = options.overlap

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        return self.comm.allreduce(array)

    def attach(self, ddp: Any) -> None:
        # worker.ddp loads torch, which the CLI's worker need not
        from switchreduce.worker.ddp import switch_allreduce_hook, switch_blocking_hook

        hook = switch_allreduce_hook if self.overlap else switch_blocking_hook
        ddp.register_comm_hook(self.comm, hook)

    def average_buckets(self, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        from switchreduce.worker.ddp import average, average_now

        start = average if self.overlap else average_now
        self.comm.step()  # a backward pass's buckets are a step, as the hooks mark them
        return torch.futures.wait_all([start(self.comm, bucket) for bucket in buckets])

    def stats(self) -> dict[str, int]:
        return dict(vars(self.comm.stats))

    @property
    def bytes_sent(self) -> int:
        return self.comm.stats.bytes_sent

    def close(self) -> None:
        self._stack.close()


@register
class GlooBackend(Backend):
    """torch.distributed's gloo allreduce (a ring): the baseline a user already has.

    With ``master`` it sets up its own process group (and tears it down);
    without, it uses the one torch.distributed already has (torchrun's).
    DDP's own allreduce is gloo's, so :meth:`attach` has nothing to do.
    """

    name = "gloo"

    def __init__(self, options: GroupOptions) -> None:
        import torch.distributed as dist

        self._owns_group = options.master is not None
        if self._owns_group:
            host, port = options.master  # type: ignore[misc]
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{host}:{port}",
                rank=options.rank,
                world_size=options.world_size,
                timeout=timedelta(seconds=options.timeout),
            )

    def attach(self, ddp: Any) -> None:
        """Nothing to do: DDP's own allreduce is gloo's."""

    def average_buckets(self, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
        """As DDP's built-in hook: each bucket divided, then summed asynchronously."""
        import torch.distributed as dist

        averages = [bucket / dist.get_world_size() for bucket in buckets]
        works = [dist.all_reduce(average, async_op=True) for average in averages]
        for work in works:
            work.wait()
        return averages

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(array.copy())
        dist.barrier()  # start together, as a switch round does: time the sum, not stragglers
        dist.all_reduce(tensor)
        return tensor.numpy()

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False


@register
class GlooFp16Backend(GlooBackend):
    """gloo with PyTorch's ``fp16_compress_hook``: every bucket travels as float16, half
    the bytes, the compression a PyTorch user turns on with one line."""

    name = "gloo-fp16"

    def attach(self, ddp: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)

    def average_buckets(self, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
        """As the hook: each bucket divided and cast to float16, summed, cast back."""
        import torch.distributed as dist

        halves = [(bucket / dist.get_world_size()).half() for bucket in buckets]
        works = [dist.all_reduce(half, async_op=True) for half in halves]
        for work in works:
            work.wait()
        return [half.to(bucket.dtype) for half, bucket in zip(halves, buckets, strict=True)]

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        if array.dtype != np.float32:
            raise WorkerError(f"{self.name} sums float32 tensors, got {array.dtype}")
        return super().allreduce(array.astype(np.float16)).astype(np.float32)


@register
class GlooPowerSGDBackend(GlooBackend):
    """gloo with PyTorch's ``powerSGD_hook`` (Vogels et al., NeurIPS'19): each gradient
    matrix travels as two rank-r factors, with error feedback, after ``powersgd_warmup``
    iterations of plain allreduce. Its state spans iterations of DDP's backward pass, so
    it has no meaning for a lone tensor."""

    name = "gloo-powersgd"

    def __init__(self, options: GroupOptions) -> None:
        super().__init__(options)
        self.options = options

    def attach(self, ddp: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=self.options.powersgd_rank,
            start_powerSGD_iter=self.options.powersgd_warmup,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)

    def average_buckets(self, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
        raise WorkerError(f"{self.name} compresses inside DDP's backward pass only")

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        raise WorkerError(
            f"{self.name} compresses DDP's gradient buckets across iterations; a lone tensor "
            "has nothing to compress against (use gloo)"
        )
