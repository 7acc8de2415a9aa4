"""One rank of a training run: ``switchreduce train`` (what torchrun or the runner starts).

The model is wrapped in DistributedDataParallel and the backend named by
``--backend`` (worker.backends) attaches to it: the switch's sums the
gradient buckets through worker.ddp's hook; gloo's leaves DDP's own
allreduce, the baseline. gloo does the
bootstrap in both cases (``init_method="env://"``: RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, as torchrun sets them).

Each rank appends one JSON record per iteration to
``OUT/metrics-{backend}-rank{r}.jsonl``; rank 0 also prints a progress line
now and then. Every rank evaluates the (identical) model on the test set at
the same iterations, so evaluation never shows up as a peer's waiting time.

``train.measure`` times the two parts of an iteration alone, with the same
model, data, processes and DDP buckets: ``compute`` trains without summing
any gradient (a DDP hook that leaves each rank its own), ``allreduce`` sums
the buckets of one backward pass each iteration as training would
(Backend.average_buckets), without the forward and backward passes.
"""

from __future__ import annotations

import gc
import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from torch.nn.parallel import DistributedDataParallel

from switchreduce.experiments.config import ExperimentConfig
from switchreduce.experiments.errors import ExperimentError
from switchreduce.experiments.records import PROGRESS, metrics_path
from switchreduce.experiments.workloads import Dataset, build_model, build_optimizer, load_dataset
from switchreduce.worker.backends import Backend, GroupOptions, open_backend
from switchreduce.worker.ddp import local_gradients_hook
from switchreduce.worker.quantize import Rounding


def interface_tx_bytes(name: str) -> int:
    """Bytes sent on ``name`` in this network namespace (/proc/net/dev is per namespace)."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        ifname, _, counters = line.partition(":")
        if ifname.strip() == name:
            return int(counters.split()[8])
    raise ValueError(f"no interface {name!r} in this network namespace")


#: The backend's counts each iteration's record carries (where it keeps them: the switch's).
COUNTED = frozenset({"retransmissions", "waits", "packets_sent", "late"})
#: torch.distributed's rendezvous, as torchrun sets it (init_method="env://").
TORCHRUN_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankOptions:
    """Where one rank finds its switch and writes its metrics (``switchreduce train``)."""

    backend: str = "switch"
    out: Path = Path(".")
    #: The switch backend: a static job's switch, or a controller to register with.
    switch: tuple[str, int] | None = None
    controller: str | None = None
    bind: tuple[str, int] = ("0.0.0.0", 0)
    #: Count the bytes this interface sends (a Mininet host's), not the backend's payload.
    interface: str | None = None
    job_id: int = 1

    def __post_init__(self) -> None:
        if self.backend == "switch" and self.switch is None and self.controller is None:
            raise ValueError("give --switch HOST:PORT or --controller URL")


def run(config: ExperimentConfig, options: RankOptions) -> int:
    """``switchreduce train``: this rank's training, under torchrun's environment."""
    missing = [name for name in TORCHRUN_ENVIRONMENT if name not in os.environ]
    if missing:
        raise ExperimentError(
            f"{', '.join(missing)} not set (run it under torchrun, or set them as torchrun does)"
        )
    options.out.mkdir(parents=True, exist_ok=True)
    train(config, options)
    return 0


def train(config: ExperimentConfig, options: RankOptions) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    t = config.train
    torch.set_num_threads(t.threads)
    dist.init_process_group(
        "gloo",
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=t.timeout * 4),
    )
    with ExitStack() as stack:
        stack.callback(dist.destroy_process_group)
        # Before it (callbacks run last first): what the training referenced, DDP's reducer
        # and gloo's finished work among it, goes while the interpreter is whole. A rank has
        # now and then aborted at exit after a complete run ("terminate called without an
        # active exception"), in gloo baselines with asynchronous work; as PyTorch's own
        # analysis of that abort has it (pytorch/pytorch#179291), gloo's objects freed in
        # the interpreter's teardown abort it. Not reproduced on demand: this narrows the
        # window, it proves nothing.
        stack.callback(gc.collect)
        _train_rank(config, options, rank, world_size, stack)


def _train_rank(
    config: ExperimentConfig, options: RankOptions, rank: int, world_size: int, stack: ExitStack
) -> None:
    """The model, its DDP and the backend (closed by ``stack``), and the training; nothing
    of it outlives the call but what ``stack`` holds."""
    t = config.train
    torch.manual_seed(t.seed)
    data = load_dataset(config.data, t.seed)
    model = build_model(config.model, data.classes, data.tokens)
    ddp = DistributedDataParallel(model, bucket_cap_mb=t.bucket_cap_mb)
    sw = config.switch
    group = GroupOptions(
        rank=rank,
        world_size=world_size,
        timeout=t.timeout,
        job_id=options.job_id,
        k=sw.k,
        slots=sw.slot_count,
        switch=options.switch,
        controller=options.controller,
        bind=options.bind,
        precision_bits=sw.precision_bits,
        lane_bits=sw.lane_bits,
        quorum=sw.quorum,
        rounding=cast(Rounding, sw.rounding),  # checked by the config
        rounding_seed=t.seed,
        error_feedback=sw.error_feedback,
        min_rto=sw.min_rto_ms / 1000,
        overlap=sw.overlap,
        powersgd_rank=t.powersgd_rank,
        powersgd_warmup=t.powersgd_warmup,
    )
    chosen = stack.enter_context(open_backend(options.backend, group))
    buckets: dict[int, torch.Tensor] = {}
    if t.measure == "training":
        chosen.attach(ddp)
    else:
        ddp.register_comm_hook(buckets, local_gradients_hook)
    optimizer = build_optimizer(config.optimizer, ddp.parameters())
    _loop(config, options, rank, world_size, ddp, optimizer, data, chosen, buckets)


def _loop(
    config: ExperimentConfig,
    options: RankOptions,
    rank: int,
    world_size: int,
    ddp: DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    chosen: Backend,
    buckets: dict[int, torch.Tensor],
) -> None:
    """The training iterations, timed from a common start; one metrics record each."""
    t = config.train
    x, y = data.shard(rank, world_size)
    batch = min(config.data.batch_size, len(y))
    compute_times = config.topology.compute_times(t.seed, rank)
    generator = torch.Generator().manual_seed(t.seed * 1000 + rank)
    order = torch.randperm(len(y), generator=generator)
    cursor, elapsed = 0, 0.0
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> torch.Tensor:
        nonlocal order, cursor
        if cursor + batch > len(y):  # a new epoch: reshuffle this rank's shard
            order, cursor = torch.randperm(len(y), generator=generator), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        ddp.train()
        loss = loss_fn(ddp(x[idx]), y[idx])
        compute = next(compute_times)
        if compute:
            time.sleep(compute)  # the emulated rest of a bigger model's compute
        optimizer.zero_grad()
        loss.backward()  # the gradients are summed here, through the hook
        optimizer.step()
        return loss

    if t.measure == "allreduce":
        # DDP cuts its buckets for good after the first backward pass: the second's are
        # what training sums every iteration, and what is summed here every iteration.
        step()
        loss = step()
        in_order = [buckets[index] for index in sorted(buckets)]
    sent = _bytes_sent(chosen, options.interface)
    counts = chosen.stats()
    progress_every = max(1, t.iterations // 20)
    dist.barrier()  # start together: what is timed is training, not start-up
    with metrics_path(options.out, options.backend, rank).open("w") as metrics:
        for iteration in range(1, t.iterations + 1):
            start = time.perf_counter()
            if t.measure == "allreduce":
                chosen.average_buckets(in_order)
            else:
                loss = step()
            seconds = time.perf_counter() - start
            elapsed += seconds
            record: dict[str, object] = {
                "iteration": iteration,
                "loss": loss.item(),
                "seconds": seconds,
                "elapsed": elapsed,
            }
            now_sent = _bytes_sent(chosen, options.interface)
            record["bytes_sent"] = _since(now_sent, sent)
            sent = now_sent
            now_counts = chosen.stats()
            for key in COUNTED & now_counts.keys():
                record[key] = now_counts[key] - counts[key]
            counts = now_counts
            if iteration % t.eval_every == 0 or iteration == t.iterations:
                record.update(_evaluate(ddp.module, data, loss_fn))
            metrics.write(json.dumps(record) + "\n")
            if rank == 0 and (iteration % progress_every == 0 or "accuracy" in record):
                print(PROGRESS + json.dumps(record), flush=True)
            if "accuracy" in record and _budget_spent(
                t.worker_seconds, elapsed * world_size, rank, iteration
            ):
                break
    dist.barrier()


def _budget_spent(budget: float | None, worker_seconds: float, rank: int, iteration: int) -> bool:
    """Whether training has spent ``budget`` (train.worker_seconds), as rank 0 counts it:
    every rank stops at the same iteration, or the next allreduce would wait forever.

    Rank 0's word goes through the rendezvous store, not a gloo collective: with a
    broadcast on the gloo group here, a rank now and then aborted at exit (SIGABRT,
    "terminate called without an active exception"), on loopback and in Mininet."""
    if budget is None:
        return False
    store = distributed_c10d._get_default_store()
    key = f"switchreduce/budget-spent/{iteration}"
    if rank == 0:
        store.set(key, "1" if worker_seconds >= budget else "0")
    return store.get(key) == b"1"  # waits for rank 0's word


def _since(now: int | None, before: int | None) -> int | None:
    """How much a count grew, or None where it is not known."""
    return None if now is None or before is None else now - before


def _bytes_sent(chosen: Backend, interface: str | None) -> int | None:
    """The interface's count where the rank has one to itself (Mininet); else the backend's
    own count of payload bytes (the switch's); unknown for gloo on a shared loopback."""
    if interface is not None:
        return interface_tx_bytes(interface)
    return chosen.bytes_sent


def _evaluate(model: torch.nn.Module, data: Dataset, loss_fn: torch.nn.Module) -> dict:
    model.eval()
    with torch.no_grad():
        logits = model(data.test_x)
        accuracy = (logits.argmax(1) == data.test_y).float().mean().item()
        return {"accuracy": accuracy, "test_loss": loss_fn(logits, data.test_y).item()}
