"""The controller's hold on its switch, kept across restarts of either.

A switch that restarts comes back with no pipeline, no tables and no
memory of which controller was primary. The supervisor notices (the
arbitration stream breaks, a write is refused as from a non-primary, or
a poll finds the pipeline gone), connects again, takes arbitration,
pushes the same P4Info and device config, and re-installs the forwarding
entries and the jobs it holds, with their sessions: workers whose
allreduce stalled resend and carry on. Meanwhile the API answers from
what the controller holds, and says the switch is unavailable.
"""

from __future__ import annotations

import logging
import threading

from p4.config.v1 import p4info_pb2

from switchreduce.controller.connection import SwitchConnection
from switchreduce.controller.errors import ControllerError
from switchreduce.controller.forwarding import install_routes
from switchreduce.controller.jobs import JobTable

log = logging.getLogger(__name__)


class SwitchSupervisor:
    """Connects to one switch, programs it, and programs it again whenever it comes back.

    ``lock`` serializes everything that writes to the switch or reads the
    job table (the API's requests and the re-installation); ``jobs`` is the
    table of admitted jobs, whose connection is replaced on reconnection.
    """

    def __init__(
        self,
        address: str,
        p4info: p4info_pb2.P4Info,
        *,
        device_id: int = 0,
        election_id: int = 1,
        device_config: bytes = b"",
        routes: dict[int, int] | None = None,
        timeout: float = 5.0,
        poll: float = 1.0,
    ) -> None:
        self.address = address
        self.p4info = p4info
        self.device_id = device_id
        self.election_id = election_id
        self.device_config = device_config
        self.routes = routes or {}
        self.timeout = timeout
        self.poll = poll
        self.lock = threading.RLock()
        self._jobs: JobTable | None = None
        #: Why the switch cannot be used now; None while it can.
        self.problem: str | None = None
        self._wake = threading.Event()

    @property
    def jobs(self) -> JobTable:
        """The admitted jobs, on the current connection (from ``start`` on)."""
        if self._jobs is None:
            raise RuntimeError("the supervisor has no job table before start()")
        return self._jobs

    @property
    def available(self) -> bool:
        return self.problem is None

    def _connect(self) -> SwitchConnection:
        return SwitchConnection(
            self.address,
            self.device_id,
            self.election_id,
            self.p4info,
            self.timeout,
            on_lost=self._wake.set,
        )

    def start(self) -> list[int]:
        """Connect and program the switch, or adopt the jobs it runs if it already runs this
        program (a restarted controller); returns the adopted job ids. Errors propagate:
        a controller without its switch has nothing to do."""
        conn = self._connect()
        try:
            self._jobs = jobs = JobTable(conn)
            if conn.installed_p4info() == self.p4info:
                jobs.recover()
            else:
                conn.push_pipeline(self.device_config)
            install_routes(conn, self.routes)
        except BaseException:
            conn.close()
            raise
        return sorted(jobs.jobs)

    def suspect(self) -> None:
        """A call failed as if the switch were gone: check now rather than at the next poll."""
        self._wake.set()

    def watch(self, stop: threading.Event) -> None:
        """Check the switch every ``poll`` seconds, or at once when woken, until ``stop``;
        reconnect and re-program it while it is gone. Run in a daemon thread."""
        while not stop.is_set():
            self._wake.wait(self.poll)
            self._wake.clear()
            if stop.is_set():
                return
            if self.available:
                problem = self._check()
                if problem is None:
                    continue
                with self.lock:
                    self.problem = problem
                log.warning("switch %s unavailable: %s", self.address, problem)
            self._reconnect()

    def _check(self) -> str | None:
        """Why the switch is unusable now, or None; cleans up after unreachable releases."""
        conn = self.jobs.conn
        if conn.lost.is_set():
            return "the P4Runtime stream broke (the switch stopped or restarted)"
        try:
            if conn.installed_p4info() != self.p4info:
                return "the switch no longer runs the pipeline (it restarted)"
            if self.jobs.dirty:
                with self.lock:
                    self.jobs.reinstall()
        except ControllerError as exc:
            return str(exc)
        return None

    def _reconnect(self) -> None:
        """One attempt: connect, take arbitration, push, re-install. On failure the reason
        is kept in ``problem`` and the next wake-up tries again."""
        with self.lock:
            # First: a switch still holding our old stream refuses a second one with the same
            # election id (INVALID_ARGUMENT, as PI does), so the new one would never get in.
            self.jobs.conn.close()
        try:
            conn = self._connect()
        except ControllerError as exc:
            self._still_unavailable(str(exc))
            return
        try:
            with self.lock:
                self.jobs.conn = conn
                pushed = conn.installed_p4info() != self.p4info
                if pushed:
                    conn.push_pipeline(self.device_config)
                install_routes(conn, self.routes)
                self.jobs.reinstall()
                self.problem = None
        except ControllerError as exc:
            conn.close()
            self._still_unavailable(str(exc))
            return
        lost = sorted(self.jobs.lost)
        log.info(
            "switch %s is back: %s, forwarding and jobs %s in place%s",
            self.address,
            "pipeline pushed" if pushed else "it kept its pipeline",
            sorted(set(self.jobs.jobs) - set(lost)),
            f", jobs {lost} lost" if lost else "",
        )

    def _still_unavailable(self, problem: str) -> None:
        if problem != self.problem:
            log.warning("switch %s still unavailable: %s", self.address, problem)
        with self.lock:
            self.problem = problem
