"""Joining a job through the controller's registration API (controller/api.py).

The worker first asks the controller where the switch's data plane is and
connects its socket there, so the kernel picks the source address its
packets will carry (a socket bound to 0.0.0.0 has none until then); that
address is what it registers, and what the switch then accepts. The
answer says how many slots the job has and its session.

A :class:`Membership` holds the rank's place in the job until ``close``:
a daemon thread renews the job's lease, so the controller releases the job
if every rank dies; ``close`` tells the controller the rank is done, and
the last rank out releases the job, so the same job id can run again.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from http import HTTPStatus

from switchreduce.worker.errors import WorkerError
from switchreduce.worker.shim import JobBinding

log = logging.getLogger(__name__)

#: First pause before asking an unreachable controller again to let a rank leave.
LEAVE_RETRY = 0.2


class RegistrationError(WorkerError):
    """The controller refused a request (``status`` is its HTTP status) or could not be
    reached (``status`` is None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _call(
    controller: str, method: str, path: str, body: dict | None = None, timeout: float = 10.0
) -> dict:
    """One JSON request to the controller; its JSON answer."""
    request = urllib.request.Request(
        f"{controller.rstrip('/')}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read() or b"{}").get("error", exc.reason)
        except (ValueError, OSError, http.client.HTTPException):  # no readable body
            reason = exc.reason
        raise RegistrationError(str(reason), exc.code) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # refused, reset, or an answer cut short (a controller restarting mid-reply)
        raise RegistrationError(f"controller {controller} unreachable: {exc}") from None


class Membership:
    """This rank's place in a job: its ``binding``, kept until ``close`` (or the end of a
    ``with`` block).

    For a controller's job a daemon thread renews the lease every lease/3
    seconds; a controller that is briefly unreachable (restarting) is
    retried, a refusal (the job was released) ends the renewals with a
    warning. A static job (no controller) has nothing to keep.
    """

    def __init__(
        self, binding: JobBinding, controller: str | None = None, lease: float | None = None
    ) -> None:
        self.binding = binding
        self.controller = controller
        self.lease = lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if controller is not None and lease is not None:
            self._thread = threading.Thread(
                target=self._renew,
                args=(controller, lease),
                daemon=True,
                name=f"lease-job{binding.job_id}-rank{binding.rank}",
            )
            self._thread.start()

    def _path(self, tail: str) -> str:
        return f"/v1/jobs/{self.binding.job_id}/{tail}"

    def _renew(self, controller: str, lease: float) -> None:
        while not self._stop.wait(lease / 3):
            try:
                _call(
                    controller,
                    "POST",
                    self._path("lease"),
                    {"session": self.binding.session},
                    timeout=lease,
                )
            except RegistrationError as exc:
                if exc.status is None:
                    continue  # the controller is restarting: it recovers the job, try again
                log.warning(
                    "job %d rank %d: the controller ended the job's lease: %s",
                    self.binding.job_id,
                    self.binding.rank,
                    exc,
                )
                return

    def close(self) -> None:
        """Stop renewing and tell the controller this rank is done.

        A controller that cannot be reached (restarting, or its packets lost on a
        saturated switch) is asked again until the lease would have ended the job
        anyway; a job the controller no longer holds has nothing left to leave (an
        earlier attempt may have released it, its answer lost)."""
        if self._thread is None or self.controller is None:  # a static job: nothing to tell
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        assert self.lease is not None  # a thread runs only for a controller's lease
        deadline = time.monotonic() + self.lease
        pause = LEAVE_RETRY
        while True:
            remaining = deadline - time.monotonic()
            try:
                _call(
                    self.controller,
                    "DELETE",
                    self._path(f"workers/{self.binding.rank}"),
                    {"session": self.binding.session},
                    timeout=max(0.1, min(10.0, remaining)),
                )
                return
            except RegistrationError as exc:
                if exc.status == HTTPStatus.NOT_FOUND:
                    return
                if exc.status is None and remaining > pause:
                    time.sleep(pause)
                    pause = min(2 * pause, 2.0)
                    continue
                log.warning(
                    "job %d rank %d: could not leave the job (its lease will end it): %s",
                    self.binding.job_id,
                    self.binding.rank,
                    exc,
                )
                return

    def __enter__(self) -> Membership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def join(
    sock: socket.socket,
    job_id: int,
    rank: int,
    world_size: int,
    k: int,
    *,
    switch: tuple[str, int] | None = None,
    slots: int | None = None,
    controller: str | None = None,
    timeout: float = 60.0,
    lane_bits: int = 32,
    quorum: int | None = None,
) -> Membership:
    """This rank's membership: from the controller (which admits the job's ``lane_bits`` and
    ``quorum``), or for a job installed statically at ``switch`` with ``slots`` slots."""
    if controller is not None:
        return register(controller, job_id, rank, world_size, sock, k, timeout, lane_bits, quorum)
    if switch is None or slots is None:
        raise WorkerError("give the switch's HOST:PORT and slot count, or a controller URL")
    return Membership(JobBinding(job_id, rank, world_size, slots, switch, quorum=quorum))


def register(
    controller: str,
    job_id: int,
    rank: int,
    world_size: int,
    sock: socket.socket,
    k: int,
    timeout: float = 60.0,
    lane_bits: int = 32,
    quorum: int | None = None,
) -> Membership:
    """Register this rank's address for ``job_id``; returns once every rank has registered.
    The first rank's ``lane_bits`` and ``quorum`` are the job's; a rank that asks for others
    is refused."""
    what = f"rank {rank} of job {job_id}"
    try:
        info = _call(controller, "GET", "/v1/switch", timeout=timeout)
        host, _, port = info["data_plane"].rpartition(":")
        sock.connect((host, int(port)))  # the kernel picks the source address now
        ip, udp_port = sock.getsockname()
        answer = _call(
            controller,
            "POST",
            f"/v1/jobs/{job_id}/workers",
            {
                "rank": rank,
                "world_size": world_size,
                "ip": ip,
                "udp_port": udp_port,
                "k": k,
                "lane_bits": lane_bits,
                **({} if quorum is None else {"quorum": quorum}),
            },
            timeout=timeout,
        )
    except RegistrationError as exc:
        refused = "controller refused " if exc.status is not None else ""
        raise RegistrationError(f"{refused}{what}: {exc}", exc.status) from None
    except OSError as exc:
        raise RegistrationError(f"{what}: cannot reach the switch's data plane: {exc}") from None
    host, _, port = answer["switch"].rpartition(":")
    binding = JobBinding(
        job_id,
        rank,
        world_size,
        answer["slot_count"],
        (host, int(port)),
        session=answer["session"],
        lane_bits=answer["lane_bits"],
        quorum=None if answer["quorum"] == world_size else answer["quorum"],
    )
    return Membership(binding, controller, answer["lease"])
