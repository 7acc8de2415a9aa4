"""Workers registering with the controller over HTTP, then allreducing through the switch."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from switchreduce.controller.api import Registry, make_server
from switchreduce.controller.supervisor import SwitchSupervisor
from switchreduce.p4runtime.schema import load_p4info
from switchreduce.worker.reference import check, synthetic_tensor
from switchreduce.worker.registration import RegistrationError, register
from switchreduce.worker.shim import SwitchCommunicator, WorkerOptions
from tests.helpers.net import bound_udp_sockets
from tests.helpers.threads import each_rank

K = 256


@pytest.fixture
def controller(programmable_switch):
    """The switch supervised, a registry and its HTTP API; yields (URL, switch)."""
    supervisor = SwitchSupervisor(programmable_switch.p4runtime, load_p4info())
    supervisor.start()
    host, port = programmable_switch.data_plane
    registry = Registry(supervisor, K, 16, f"{host}:{port}", timeout=3.0)
    http = make_server(registry, ("127.0.0.1", 0))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}", programmable_switch.switch
    http.shutdown()
    supervisor.jobs.conn.close()


def test_registered_workers_allreduce_exactly_and_the_job_is_released(controller) -> None:
    url, soft = controller
    world_size = 3
    inputs = [synthetic_tensor(9, r, 50_000, "float32") for r in range(world_size)]
    memberships = []  # kept open: the job runs until the operator ends it

    def rank(r: int) -> object:
        sock = bound_udp_sockets(1)[0]
        membership = register(url, 11, r, world_size, sock, K)
        memberships.append(membership)
        with SwitchCommunicator(membership.binding, WorkerOptions(k=K, timeout=20), sock) as comm:
            return comm.allreduce(inputs[r])

    results = each_rank(world_size, rank)
    assert all(check(results[r], inputs, K).exact for r in range(world_size))
    status = json.load(urllib.request.urlopen(f"{url}/v1/jobs"))
    assert [job["job_id"] for job in status["jobs"]] == [11]
    assert set(status["drops"]) >= {"unbound_worker", "stale", "duplicate"}
    assert status["jobs"][0]["packets"]["results"] >= 50_000 // K
    request = urllib.request.Request(f"{url}/v1/jobs/11", method="DELETE")
    assert json.load(urllib.request.urlopen(request)) == {"released": 11}
    assert all(not table.entries for table in soft.tables().values())


def _register_in_thread(url: str, job_id: int, rank: int, world_size: int) -> threading.Thread:
    """Register in the background; returns once the controller holds the registration."""
    thread = threading.Thread(
        target=lambda: register(url, job_id, rank, world_size, bound_udp_sockets(1)[0], K),
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 5
    while rank not in json.load(urllib.request.urlopen(f"{url}/v1/jobs"))["pending"].get(
        str(job_id), []
    ):
        assert time.monotonic() < deadline, "the registration never arrived"
        time.sleep(0.01)
    return thread


def test_a_taken_rank_and_a_disagreeing_world_size_are_conflicts(controller) -> None:
    url, _ = controller
    waiting = _register_in_thread(url, 12, 0, 2)
    with pytest.raises(RegistrationError, match="rank 0 of job 12 is already registered"):
        register(url, 12, 0, 2, bound_udp_sockets(1)[0], K)
    with pytest.raises(RegistrationError, match="world size 2, not 3"):
        register(url, 12, 1, 3, bound_udp_sockets(1)[0], K)
    register(url, 12, 1, 2, bound_udp_sockets(1)[0], K)  # the right rank 1 completes the job
    waiting.join()


def test_bad_registrations_are_refused(controller) -> None:
    url, soft = controller
    with pytest.raises(RegistrationError, match=r"rank: must be 0\.\.1 for world size 2, got 5"):
        register(url, 13, 5, 2, bound_udp_sockets(1)[0], K)
    with pytest.raises(RegistrationError, match="switch runs K=256"):
        register(url, 14, 0, 1, bound_udp_sockets(1)[0], 64)
    assert (14,) not in soft.ingress.jobs.entries  # refused before anything was admitted
    request = urllib.request.Request(f"{url}/v1/jobs/99", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request)
    assert missing.value.code == 404


def test_missing_ranks_time_out_and_the_registration_is_withdrawn(controller) -> None:
    url, soft = controller
    with pytest.raises(RegistrationError, match=r"ranks \[1\] did not register"):
        register(url, 15, 0, 2, bound_udp_sockets(1)[0], K)
    assert not soft.ingress.jobs.entries
    # Withdrawn: rank 0 can register again later.
    waiting = _register_in_thread(url, 15, 0, 2)
    register(url, 15, 1, 2, bound_udp_sockets(1)[0], K)
    waiting.join()
    assert (15,) in soft.ingress.jobs.entries
