"""Allreduce backends by name (worker/backends.py): the registry, and gloo as the CLI runs it."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from switchreduce.launch import cli_command
from switchreduce.ports import free_tcp_port
from switchreduce.worker.backends import BACKENDS, Backend, GroupOptions, open_backend, register


@pytest.mark.fast
def test_switch_and_gloo_are_registered_and_an_unknown_name_says_what_there_is() -> None:
    assert {"switch", "gloo"} <= set(BACKENDS)
    with pytest.raises(ValueError, match=r"no allreduce backend 'mpi'; there are \['gloo'"):
        open_backend("mpi", GroupOptions(rank=0, world_size=1))


@pytest.mark.fast
def test_a_new_backend_plugs_in_by_name() -> None:
    @register
    class Alone(Backend):
        """A world of one: the sum is the input."""

        name = "alone-for-test"

        def __init__(self, options: GroupOptions) -> None:
            self.world_size = options.world_size

        def allreduce(self, array: np.ndarray) -> np.ndarray:
            return array.copy()

        def attach(self, ddp: object) -> None:
            pass

        def average_buckets(self, buckets: list) -> list:
            return list(buckets)

        def close(self) -> None:
            pass

    try:
        with open_backend("alone-for-test", GroupOptions(rank=0, world_size=1)) as backend:
            assert backend.allreduce(np.arange(3)).tolist() == [0, 1, 2]
            assert backend.bytes_sent is None and backend.stats() == {}
    finally:
        del BACKENDS["alone-for-test"]


def test_gloo_workers_on_loopback_sum_what_the_switch_would() -> None:
    master = f"127.0.0.1:{free_tcp_port()}"
    procs = [
        subprocess.Popen(
            cli_command(
                "worker",
                "--backend",
                "gloo",
                "--master",
                master,
                "--rank",
                str(rank),
                "--world-size",
                "2",
                "--elements",
                "5000",
                "--dtype",
                "int32",
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        report = json.loads(out.splitlines()[-1])
        assert proc.returncode == 0 and report["backend"] == "gloo"
        assert report["max_abs_error"] == 0.0  # int32: the exact sum
