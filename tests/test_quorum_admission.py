"""A job's quorum is admitted by the controller with the job, into the switch's jobs table."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from switchreduce.worker.registration import RegistrationError, register
from switchreduce.worker.shim import SwitchCommunicator, WorkerOptions
from tests.helpers.net import bound_udp_sockets
from tests.helpers.threads import each_rank
from tests.test_controller_api import K, controller  # noqa: F401  (the fixture)


def test_the_controller_admits_a_quorum_and_its_ranks_share_every_sum(controller) -> None:  # noqa: F811
    """Three ranks, a quorum of two: each chunk holds two ranks' contributions, every rank gets
    the same sums, and each chunk is late for exactly one rank."""
    url, _ = controller
    world_size = 3
    inputs = [np.arange(40 * K, dtype=np.int32) * (r + 1) for r in range(world_size)]
    comms, listed = {}, []

    def rank(r: int) -> np.ndarray:
        sock = bound_udp_sockets(1)[0]
        membership = register(url, 31, r, world_size, sock, K, quorum=2)
        if r == 0:
            listed.extend(json.load(urllib.request.urlopen(f"{url}/v1/jobs"))["jobs"])
        with membership, SwitchCommunicator(membership.binding, WorkerOptions(k=K), sock) as c:
            comms[r] = c
            return c.allreduce(inputs[r])

    results = each_rank(world_size, rank)
    assert [job["quorum"] for job in listed if job["job_id"] == 31] == [2]
    assert {(comms[r].contributors, comms[r].averaged_over) for r in range(world_size)} == {(2, 2)}
    for r in range(1, world_size):
        np.testing.assert_array_equal(results[r], results[0])
    assert sum(comms[r].stats.late for r in range(world_size)) == 40
    sums = results[0].reshape(40, K)
    total = np.sum(inputs, axis=0).reshape(40, K)
    for chunk in range(40):  # the total less one rank's part
        assert any(np.array_equal(sums[chunk], (total - x.reshape(40, K))[chunk]) for x in inputs)


def test_a_rank_asking_for_another_quorum_is_refused(controller) -> None:  # noqa: F811
    url, _ = controller
    memberships = []

    def join(r: int) -> None:
        memberships.append(register(url, 32, r, 3, bound_udp_sockets(1)[0], K, quorum=2))

    first = threading.Thread(target=join, args=(0,))
    first.start()
    deadline = time.monotonic() + 5
    while "32" not in json.load(urllib.request.urlopen(f"{url}/v1/jobs"))["pending"]:
        assert time.monotonic() < deadline, "rank 0's registration never arrived"
        time.sleep(0.01)
    with pytest.raises(RegistrationError, match="job 32 completes a round with 2 rank"):
        register(url, 32, 1, 3, bound_udp_sockets(1)[0], K)
    with pytest.raises(RegistrationError, match=r"quorum: must be 1\.\.3"):
        register(url, 33, 0, 3, bound_udp_sockets(1)[0], K, quorum=4)
    others = [threading.Thread(target=join, args=(r,)) for r in (1, 2)]  # the job's quorum
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join()
    assert {m.binding.quorum for m in memberships} == {2}
    for membership in memberships:
        membership.close()
