"""A job's life through the controller, with the processes users start.

Every request field is checked at the door, and a refused request leaves
nothing behind (read back from the switch's tables); jobs end when their
ranks leave, or when their lease expires because the ranks died; the
controller refuses options it cannot honour, and survives a restart of
the switch under it and of itself.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from typing import cast

import numpy as np
import pytest

from switchreduce.launch import cli_command
from switchreduce.ports import free_tcp_port
from switchreduce.worker.reference import check, synthetic_tensor
from switchreduce.worker.registration import Membership, register
from switchreduce.worker.shim import SwitchCommunicator, WorkerOptions
from tests.helpers.net import bound_udp_sockets
from tests.helpers.processes import ControllerProcess, SwitchProcess
from tests.helpers.threads import each_rank

K = 256
LEASE = 2.0
SLOTS = 2048  # half the pool: two jobs fill it
JOB = 7


@pytest.fixture(scope="module")
def controller(tmp_path_factory) -> Iterator[ControllerProcess]:
    """One switch and its controller for the tests that leave nothing behind."""
    log_dir = tmp_path_factory.mktemp("controller")
    switch = SwitchProcess(log_dir).start()
    try:
        ctl = ControllerProcess(
            switch, log_dir, "--slots", str(SLOTS), "--lease", str(LEASE), "--register-timeout", "3"
        ).start()
    except BaseException:
        switch.stop()
        raise
    yield ctl
    ctl.stop()
    switch.stop()
    assert "Traceback" not in ctl.log.read_text()  # every failure was an answer or a log line


class Ranks:
    """A job's ranks in this process: each registers from a thread of its own (registration
    waits for every rank), then allreduces through a communicator of its own."""

    def __init__(self, url: str, job_id: int, world_size: int) -> None:
        self.socks = bound_udp_sockets(world_size)
        # each rank's place once _each has run: every rank registers, or _each raises
        self.memberships = cast(list[Membership], [None] * world_size)
        self._each(lambda r: self._register(url, job_id, r, world_size))
        self.comms = [
            SwitchCommunicator(m.binding, WorkerOptions(k=K, timeout=10), s)
            for m, s in zip(self.memberships, self.socks, strict=True)
        ]

    def _register(self, url: str, job_id: int, rank: int, world_size: int) -> None:
        self.memberships[rank] = register(url, job_id, rank, world_size, self.socks[rank], K)

    def _each(self, work) -> list:
        return each_rank(len(self.socks), work)

    @property
    def session(self) -> int:
        session = self.memberships[0].binding.session
        assert session is not None  # a controller's job always has one
        return session

    def allreduce_exactly(self, seed: int, elements: int = 20_000) -> None:
        inputs = [synthetic_tensor(seed, r, elements, "float32") for r in range(len(self.socks))]
        results = self._each(lambda r: self.comms[r].allreduce(inputs[r]))
        assert all(check(result, inputs, K).exact for result in results)

    def close(self) -> None:
        for comm in self.comms:
            comm.close()
        for membership in self.memberships:
            membership.close()


def _registration(**changes: object) -> dict:
    body = {"rank": 0, "world_size": 2, "ip": "127.0.0.1", "udp_port": 40000, "k": K}
    body.update(changes)
    return body


# (field the 400 must name, job id in the path, body)
BAD_REGISTRATIONS = {
    "rank-fraction": ("rank", JOB, _registration(rank=0.9)),
    "rank-bool": ("rank", JOB, _registration(rank=True)),
    "rank-string": ("rank", JOB, _registration(rank="0")),
    "rank-negative": ("rank", JOB, _registration(rank=-1)),
    "rank-not-below-world-size": ("rank", JOB, _registration(rank=2)),
    "rank-missing": ("rank", JOB, {k: v for k, v in _registration().items() if k != "rank"}),
    "world-size-33": ("world_size", JOB, _registration(world_size=33)),
    "world-size-million": ("world_size", JOB, _registration(world_size=10**6)),
    "world-size-0": ("world_size", JOB, _registration(world_size=0)),
    "world-size-bool": ("world_size", JOB, _registration(world_size=True)),
    "ip-octet": ("ip", JOB, _registration(ip="10.0.0.300")),
    "ip-v6": ("ip", JOB, _registration(ip="::1")),
    "ip-number": ("ip", JOB, _registration(ip=2130706433)),
    "ip-unspecified": ("ip", JOB, _registration(ip="0.0.0.0")),
    "udp-port-negative": ("udp_port", JOB, _registration(udp_port=-1)),
    "udp-port-0": ("udp_port", JOB, _registration(udp_port=0)),
    "udp-port-65536": ("udp_port", JOB, _registration(udp_port=65536)),
    "mac-negative": ("mac", JOB, _registration(mac=-1)),
    "mac-49-bits": ("mac", JOB, _registration(mac=1 << 48)),
    "port-512": ("port", JOB, _registration(port=512)),
    "k-other": ("k", JOB, _registration(k=64)),
    "k-float": ("k", JOB, _registration(k=256.0)),
    "unknown-field": ("rnak", JOB, _registration(rnak=0)),
    "not-json": ("body", JOB, b"{rank: 0"),
    "not-an-object": ("body", JOB, b"[0, 2]"),
    "job-0": ("job_id", 0, _registration()),
    "job-beyond-the-counters": ("job_id", 100_000, _registration()),
}


@pytest.mark.parametrize(
    ("field", "job_id", "body"), BAD_REGISTRATIONS.values(), ids=BAD_REGISTRATIONS.keys()
)
def test_a_bad_field_is_refused_at_once_naming_it_and_leaves_nothing(
    controller, field, job_id, body
) -> None:
    start = time.monotonic()
    status, answer = controller.request("POST", f"/v1/jobs/{job_id}/workers", body)
    assert (status, answer.get("field")) == (400, field), answer
    assert answer["error"].startswith(f"{field}: ")
    assert time.monotonic() - start < 1.0  # refused at the door, not after a timeout
    assert controller.jobs()["pending"] == {} and controller.jobs()["jobs"] == []
    assert controller.switch.holds_nothing()
    # The same job id registers as if nothing had happened, and leaves nothing when done.
    ranks = Ranks(controller.url, JOB, 1)
    (entry,) = controller.switch.reader.read_table("SwitchReduceIngress.jobs")
    assert entry.match == {"hdr.sr.job_id": JOB} and entry.params["session"] == ranks.session
    ranks.close()
    assert controller.jobs()["jobs"] == []
    assert controller.switch.holds_nothing()


def test_a_full_pool_is_503_at_once_and_admits_again_when_a_job_leaves(controller) -> None:
    first, second = Ranks(controller.url, 21, 1), Ranks(controller.url, 22, 1)
    start = time.monotonic()
    status, answer = controller.request("POST", "/v1/jobs/23/workers", _registration())
    assert status == 503 and "slot pool exhausted" in answer["error"], answer
    assert time.monotonic() - start < 1.0
    assert controller.jobs()["pending"] == {}
    first.close()
    third = Ranks(controller.url, 23, 1)
    assert sorted(j["job_id"] for j in controller.jobs()["jobs"]) == [22, 23]
    second.close()
    third.close()
    assert controller.switch.holds_nothing()


def test_renewals_and_leaving_need_the_jobs_session(controller) -> None:
    ranks = Ranks(controller.url, 24, 2)
    session = ranks.session
    assert controller.request("POST", "/v1/jobs/24/lease", {"session": session ^ 1})[0] == 409
    assert controller.request("DELETE", "/v1/jobs/24/workers/0", {"session": session + 1})[0] == 409
    assert controller.request("POST", "/v1/jobs/25/lease", {"session": session})[0] == 404
    assert controller.request("POST", "/v1/jobs/24/lease", {"session": "x"})[0] == 400
    assert controller.request("POST", "/v1/jobs/24/lease", {"session": session}) == (
        200,
        {"job_id": 24, "lease": LEASE},
    )
    (job,) = controller.jobs()["jobs"]
    assert "session" not in str(job)  # a job's secret is told to its ranks only
    ranks.memberships[0].close()
    assert controller.jobs()["jobs"][0]["ranks"] == [1]  # one rank out: the job stays
    ranks.close()
    assert controller.jobs()["jobs"] == []


def _readme_workers(controller: ControllerProcess, job_id: int, *extra: str) -> list:
    """The README's worker command for both ranks of a job (no --bind: 0.0.0.0)."""
    workers = []
    for rank in (0, 1):
        command = cli_command(
            "worker", "--controller", controller.url, "--job", str(job_id), "--rank", str(rank),
            "--world-size", "2", "--k", str(K), "--elements", "20000", *extra,
        )  # fmt: skip
        workers.append(
            subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return workers


def test_the_readme_workers_allreduce_leave_and_run_again(controller) -> None:
    """Workers bound to 0.0.0.0 register the address they send from; twice, one job id."""
    for _ in range(2):
        workers = _readme_workers(controller, 5)
        for proc in workers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert '"exact": true' in out
        assert controller.jobs()["jobs"] == []  # the last rank out released the job
    assert controller.log.read_text().count("job 5 released: its ranks left") == 2
    assert controller.switch.holds_nothing()


def test_a_job_whose_workers_were_killed_ends_with_its_lease(controller) -> None:
    workers = _readme_workers(controller, 6, "--wait-for-go")
    for proc in workers:
        assert proc.stdout.readline().strip() == "ready"  # registered, admitted
    assert [j["job_id"] for j in controller.jobs()["jobs"]] == [6]
    for proc in workers:
        proc.kill()
        proc.communicate()
    killed = time.monotonic()
    controller.wait_for(lambda answer: answer["jobs"] == [], timeout=LEASE + 3)
    assert time.monotonic() - killed > LEASE / 2  # the lease, not the ranks, ended it
    assert "job 6 released: its lease expired" in controller.log.read_text()
    assert controller.switch.holds_nothing()
    Ranks(controller.url, 6, 1).close()  # the id is free again


BAD_OPTIONS = {
    "no-slots": (["--slots", "0"], "--slots must be 1..4096"),
    "more-slots-than-the-pool": (["--slots", "5000"], "--slots must be 1..4096"),
    "no-lease": (["--lease", "0"], "--lease must be positive"),
    "negative-lease": (["--lease", "-1"], "--lease must be positive"),
    "no-registration-time": (["--register-timeout", "0"], "--register-timeout must be positive"),
    "k-not-the-programs": (["--k", "64"], "--k 64, but the P4Info is compiled for K=256"),
    "missing-p4info": (["--p4info", "/nonexistent.txtpb"], "cannot use the program's files"),
}


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_are_refused_in_one_line(options, message) -> None:
    command = cli_command(
        "controller", "--p4runtime", f"127.0.0.1:{free_tcp_port()}",
        "--data-plane", "127.0.0.1:48864", "--listen", "127.0.0.1:0", *options,
    )  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"switchreduce controller: {message}"), line


def test_a_switch_of_another_k_is_refused_in_one_line(tmp_path) -> None:
    switch = SwitchProcess(tmp_path, k=64).start()
    try:
        done = subprocess.run(
            cli_command("controller", "--p4runtime", switch.p4runtime, "--data-plane",
                        switch.data_plane, "--listen", "127.0.0.1:0", "--k", str(K)),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        switch.stop()
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("switchreduce controller: ")
    assert "compiled for K=256" in line and "runs K=64" in line


class _Watcher(threading.Thread):
    """GET /v1/jobs as fast as it answers, keeping every answer's status and switch state."""

    def __init__(self, controller: ControllerProcess) -> None:
        super().__init__(daemon=True)
        self.controller = controller
        self.seen: list[tuple[int, str]] = []
        self.failures: list[Exception] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, answer = self.controller.request("GET", "/v1/jobs")
                self.seen.append((status, answer["switch"]))
            except Exception as exc:  # a closed connection, say: the test fails on it
                self.failures.append(exc)
            time.sleep(0.02)


def test_the_controller_reprograms_a_restarted_switch(tmp_path) -> None:
    switch = SwitchProcess(tmp_path).start()
    controller = ControllerProcess(
        switch, tmp_path, "--slots", "32", "--lease", "10", "--route", "02:00:00:00:00:01=1"
    ).start()
    watcher = _Watcher(controller)
    try:
        old = Ranks(controller.url, 8, 2)
        old.allreduce_exactly(seed=1)
        watcher.start()
        switch.stop(kill=True)
        down = controller.wait_for(lambda answer: answer["switch"] == "unavailable")
        assert [job["job_id"] for job in down["jobs"]] == [8] and down["drops"] is None
        status, answer = controller.request(
            "POST", "/v1/jobs/9/workers", _registration(world_size=1)
        )
        assert status == 503 and "unavailable" in answer["error"]
        switch.start()  # the same ports, empty
        controller.wait_for(lambda answer: answer["switch"] == "available")
        state = switch.job_state()
        (entry,) = state["SwitchReduceIngress.jobs"]
        assert entry.params["session"] == old.session  # the same job, the same session
        assert len(state["SwitchReduceIngress.workers"]) == 2 and list(state["groups"]) == [8]
        forward = switch.reader.read_table("SwitchReduceIngress.forward")
        assert [e.params for e in forward] == [{"port": 1}]
        new = Ranks(controller.url, 9, 2)
        new.allreduce_exactly(seed=2)
        old.allreduce_exactly(seed=3)  # the job from before the restart carries on
        new.close()
        old.close()
        assert controller.jobs()["jobs"] == []
        assert switch.holds_nothing()
    finally:
        watcher.stop.set()
        controller.stop()
        switch.stop()
    watcher.join()
    assert watcher.failures == []
    assert {status for status, _ in watcher.seen} == {200}
    states = [state for _, state in watcher.seen]
    assert "unavailable" in states and states[-1] == "available"
    log = controller.log.read_text()
    assert "Traceback" not in log and "is back: pipeline pushed" in log


def test_a_restarted_controller_recovers_the_jobs_and_their_leases(tmp_path) -> None:
    switch = SwitchProcess(tmp_path).start()
    first = ControllerProcess(switch, tmp_path, "--slots", "32", "--lease", str(LEASE)).start()
    second = ControllerProcess(switch, tmp_path, "--slots", "32", "--lease", str(LEASE))
    second.listen, second.url = first.listen, first.url  # where the workers renew
    sock = bound_udp_sockets(1)[0]
    try:
        alive = Ranks(first.url, 10, 1)
        # A rank that registers and dies at once: nobody renews job 11.
        dead = _registration(world_size=1, udp_port=sock.getsockname()[1])
        status, _ = first.request("POST", "/v1/jobs/11/workers", dead)
        assert status == 200
        first.stop(kill=True)
        second.start()
        assert "recovered jobs [10, 11] from the switch" in second.log.read_text()
        assert sorted(job["job_id"] for job in second.jobs()["jobs"]) == [10, 11]
        second.wait_for(
            lambda answer: [j["job_id"] for j in answer["jobs"]] == [10], timeout=LEASE + 3
        )
        assert "job 11 released: its lease expired" in second.log.read_text()
        alive.allreduce_exactly(seed=4)
        alive.close()  # leaves with the session the new controller read from the switch
        assert second.jobs()["jobs"] == []
        assert all(not entries for entries in switch.job_state().values())
    finally:
        second.stop()
        first.stop()
        switch.stop()
        sock.close()


def test_a_rank_leaves_through_a_controller_that_was_down_when_it_left(tmp_path) -> None:
    """A rank that finishes while its controller restarts asks again: the job ends because its
    ranks left, not seconds later by its lease (CI once found a job held after its ranks)."""
    switch = SwitchProcess(tmp_path).start()
    first = ControllerProcess(switch, tmp_path, "--slots", "32", "--lease", "20").start()
    second = ControllerProcess(switch, tmp_path, "--slots", "32", "--lease", "20")
    second.listen, second.url = first.listen, first.url
    try:
        ranks = Ranks(first.url, 12, 1)
        ranks.allreduce_exactly(seed=5)
        first.stop(kill=True)
        leaving = threading.Thread(target=ranks.close)
        leaving.start()
        time.sleep(1.0)  # the rank's first attempts find nobody listening
        assert leaving.is_alive()
        second.start()
        leaving.join(timeout=15)
        assert not leaving.is_alive()
        assert second.jobs()["jobs"] == []
        assert "job 12 released: its ranks left" in second.log.read_text()
    finally:
        second.stop()
        first.stop()
        switch.stop()


@pytest.mark.parametrize("kill", [True, False], ids=["kill-9", "clean"])
def test_a_new_int32_job_after_a_controller_restart_sums_its_own_data(tmp_path, kill) -> None:
    """Issue 8's second reproduction: release a job, restart the controller, admit a job of
    the same shape on the same slots: it once got the same generation and the old sums."""
    switch = SwitchProcess(tmp_path).start()
    first = ControllerProcess(switch, tmp_path, "--slots", "4", "--lease", str(LEASE)).start()
    second = ControllerProcess(switch, tmp_path, "--slots", "4", "--lease", str(LEASE))
    second.listen, second.url = first.listen, first.url
    elements = 4 * 3 * K  # every slot used three times
    try:
        sums = []
        for controller, values in ((first, (1, 2)), (second, (10, 20))):
            if controller is second:
                first.stop(kill=kill)
                second.start()
            ranks = Ranks(controller.url, JOB, 2)
            inputs = [np.full(elements, v, np.int32) for v in values]
            sums.append(
                ranks._each(
                    lambda r, ranks=ranks, inputs=inputs: ranks.comms[r].allreduce(inputs[r])
                )
            )
            ranks.close()  # both ranks leave: the job is released
            assert controller.jobs()["jobs"] == []
        assert all((s == 3).all() for s in sums[0]) and all((s == 30).all() for s in sums[1])
    finally:
        second.stop()
        first.stop()
        switch.stop()
