"""Joining a job through the controller's registration API (controller/api.py).

The worker binds its socket first, so it can tell the controller the exact
address the switch must accept its packets from; the answer says where the
switch is and how many slots the job has.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from worker.errors import WorkerError
from worker.shim import JobBinding


class RegistrationError(WorkerError):
    """The controller refused the registration, or could not be reached."""


def join(sock: socket.socket, job_id: int, rank: int, world_size: int, k: int, *,
         switch: tuple[str, int] | None = None, slots: int | None = None,
         controller: str | None = None, timeout: float = 60.0) -> JobBinding:  # fmt: skip
    """This rank's binding: from the controller, or for a job installed statically at ``switch``
    with ``slots`` slots."""
    if controller is not None:
        return register(controller, job_id, rank, world_size, sock, k, timeout)
    if switch is None or slots is None:
        raise WorkerError("give the switch's HOST:PORT and slot count, or a controller URL")
    return JobBinding(job_id, rank, world_size, slots, switch)


def register(controller: str, job_id: int, rank: int, world_size: int, sock: socket.socket,
             k: int, timeout: float = 60.0) -> JobBinding:  # fmt: skip
    """Register this rank's address for ``job_id``; returns once every rank has registered."""
    ip, udp_port = sock.getsockname()
    body = json.dumps(
        {"rank": rank, "world_size": world_size, "ip": ip, "udp_port": udp_port, "k": k}
    )
    request = urllib.request.Request(
        f"{controller.rstrip('/')}/v1/jobs/{job_id}/workers", data=body.encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        reason = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise RegistrationError(
            f"controller refused rank {rank} of job {job_id}: {reason}"
        ) from None
    except OSError as exc:
        raise RegistrationError(f"controller {controller} unreachable: {exc}") from None
    host, _, port = answer["switch"].rpartition(":")
    return JobBinding(job_id, rank, world_size, answer["slot_count"], (host, int(port)))
