"""A job's lane width is admitted by the controller with the job, and every rank must use it."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from switchreduce.worker.errors import MismatchError
from switchreduce.worker.reference import check, synthetic_tensor
from switchreduce.worker.registration import RegistrationError, register
from switchreduce.worker.shim import JobBinding, SwitchCommunicator, WorkerOptions
from tests.helpers.net import bound_udp_sockets
from tests.helpers.threads import each_rank
from tests.test_controller_api import K, controller  # noqa: F401  (the fixture)


def test_the_controller_admits_a_jobs_lane_width_and_its_ranks_sum_in_it(controller) -> None:  # noqa: F811
    url, _ = controller
    world_size, lanes = 3, 8
    inputs = [synthetic_tensor(5, r, 30_000, "float32") for r in range(world_size)]
    bindings = {}

    def rank(r: int) -> object:
        sock = bound_udp_sockets(1)[0]
        membership = register(url, 21, r, world_size, sock, K, lane_bits=lanes)
        bindings[r] = membership.binding
        options = WorkerOptions(k=K, timeout=20, lane_bits=lanes)
        with membership, SwitchCommunicator(membership.binding, options, sock) as comm:
            return comm.allreduce(inputs[r])

    results = each_rank(world_size, rank)
    assert {b.lane_bits for b in bindings.values()} == {lanes}
    for r in range(world_size):
        verdict = check(results[r], inputs, K * 32 // lanes, lane_bits=lanes)
        assert verdict.exact and verdict.within_bound, verdict


def test_a_rank_asking_for_another_lane_width_is_refused(controller) -> None:  # noqa: F811
    url, _ = controller
    first = threading.Thread(
        target=lambda: register(url, 22, 0, 2, bound_udp_sockets(1)[0], K, lane_bits=8),
        daemon=True,
    )
    first.start()
    deadline = time.monotonic() + 5
    while "22" not in json.load(urllib.request.urlopen(f"{url}/v1/jobs"))["pending"]:
        assert time.monotonic() < deadline, "rank 0's registration never arrived"
        time.sleep(0.01)
    with pytest.raises(RegistrationError, match="job 22 sends 8-bit lanes, not 16-bit"):
        register(url, 22, 1, 2, bound_udp_sockets(1)[0], K, lane_bits=16)
    with pytest.raises(RegistrationError, match=r"lane_bits: must be one of \(32, 16, 8\)"):
        register(url, 23, 0, 1, bound_udp_sockets(1)[0], K, lane_bits=4)
    register(url, 22, 1, 2, bound_udp_sockets(1)[0], K, lane_bits=8)  # the job's width admits
    first.join()


def test_a_rank_started_with_another_lane_width_fails_before_sending() -> None:
    binding = JobBinding(1, 0, 2, 4, ("127.0.0.1", 9), session=7, lane_bits=8)
    sock = bound_udp_sockets(1)[0]
    with pytest.raises(MismatchError, match=r"admitted with 8-bit lanes, this rank .* 16-bit"):
        SwitchCommunicator(binding, WorkerOptions(k=K, lane_bits=16), sock)
    with pytest.raises(OSError):  # never connected to the switch, so nothing was sent
        sock.getpeername()
    sock.close()
