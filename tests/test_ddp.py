"""DistributedDataParallel with the switch's hooks: gradients are the ranks' average, as gloo's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from switchreduce.p4runtime.names import JobStat
from switchreduce.worker import quantize as q
from tests.helpers.ddp_rank import PASSES, gradients, model_and_batch

HELPER = Path(__file__).resolve().parent / "helpers" / "ddp_rank.py"


@pytest.mark.parametrize("hook", ["switch_allreduce_hook", "switch_blocking_hook"])
def test_ddp_gradients_through_the_switch_are_gloos_within_the_bound(
    job_factory, tmp_path, hook: str
) -> None:
    """Several buckets, several backward passes: the overlapped hook (buckets queued while the
    backward pass goes on) and the blocking one both give gloo's average, within the bound."""
    world_size = 3
    with job_factory(world_size, k=256) as job:
        switch_port = job.server.address[1]
        ports = [comm.address[1] for comm in job.comms]
        for comm in job.comms:
            comm.close()  # the rank processes bind these addresses themselves
        env = dict(os.environ, PYTHONPATH=str(HELPER.parents[2]))
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(HELPER),
                    str(rank),
                    str(world_size),
                    str(tmp_path / "store"),
                    str(switch_port),
                    str(ports[rank]),
                    str(tmp_path / f"grad{rank}.npz"),
                    str(job.comms[rank].session),
                    hook,
                ],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
        results = job.switch.ingress.job_stats[JobStat.RESULTS].packets[1]
    expected = []
    for rank in range(world_size):
        model, inputs, labels = model_and_batch(rank)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        expected.append(gradients(model).astype(np.float64))
    total = np.sum(expected, axis=0)
    average = total / world_size
    # worker.quantize's bound on the sum, for the largest exponent of any block (the bound
    # grows with the exponent, so it holds whichever way DDP cut the buckets), divided by
    # n, plus the float32 rounding of the division.
    peak = max(q.block_exponents(g.reshape(1, -1).astype(np.float32))[0] for g in expected)
    sum_bound = q.error_bound(np.array([peak]), world_size, total.reshape(1, -1))[0]
    bound = sum_bound / world_size + np.spacing(np.abs(average).astype(np.float32)) / 2
    # gloo's ring sums in float32: at most world_size - 1 roundings of partial sums.
    gloo_bound = (world_size - 1) * np.finfo(np.float32).eps * np.sum(np.abs(expected), axis=0)
    gloo_bound = gloo_bound / world_size + np.spacing(np.abs(average).astype(np.float32))
    for rank in range(world_size):
        got = np.load(tmp_path / f"grad{rank}.npz")
        assert (np.abs(got["switch"] - average) <= bound).all()
        assert (np.abs(got["gloo"] - average) <= gloo_bound).all()
        assert (np.abs(got["switch"] - got["gloo"]) <= bound + gloo_bound).all()
        assert len(got["bucket_sizes"]) >= 3  # DDP cut several buckets after the first pass
        assert sum(got["bucket_sizes"]) == 4 * average.size
    chunks = -(-expected[0].size // 256)
    assert results >= PASSES * chunks  # every pass's sums came from the switch
