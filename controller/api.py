"""The controller's registration API: HTTP/JSON, as SwitchML's session requests.

POST   /v1/jobs/{job_id}/workers   {"rank", "world_size", "ip", "udp_port", "k"[, "mac", "port"]}
    Waits until all ranks of the job have registered, admits the job once,
    then answers every rank: {"job_id", "rank", "world_size", "slot_count", "k",
    "switch": "host:port"}. 400 for a bad request, 409 for a rank already
    taken or a world size that disagrees, 504 if the others do not come in
    time (the registration is then withdrawn).
DELETE /v1/jobs/{job_id}           release the job: every entry it installed goes.
GET    /v1/jobs                    {"jobs": admitted jobs with the switch's per-job counters,
                                    "pending": {job id: ranks registered so far},
                                    "drops": the switch's drops by reason (switch-wide:
                                    most reasons, an unknown job say, belong to no job)}
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from controller.errors import AdmissionError, ControllerError
from controller.jobs import Job, JobTable, Member, replica_id
from switchreduce.wire import DropReason

_WORKERS = re.compile(r"^/v1/jobs/(\d+)/workers$")
_JOB = re.compile(r"^/v1/jobs/(\d+)$")


class _Pending:
    """Registrations of a job not yet admitted."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.members: dict[int, Member] = {}
        self.done = threading.Event()
        self.job: Job | None = None
        self.error: Exception | None = None


class Registry:
    """Collects ranks into jobs and admits each job when it is complete."""

    def __init__(self, jobs: JobTable, k: int, slot_count: int, switch: str,
                 timeout: float = 30.0,
                 attachments: dict[str, tuple[int, int]] | None = None) -> None:  # fmt: skip
        self.jobs = jobs
        #: Where each host is attached (IP -> (MAC, switch port)): workers cannot know it.
        self.attachments = attachments
        self.k = k
        self.slot_count = slot_count
        self.switch = switch
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}

    def register(self, job_id: int, world_size: int, member: Member, k: int) -> dict:
        if k != self.k:
            raise AdmissionError(f"the switch runs K={self.k}, the worker asked for K={k}")
        if self.attachments is not None:
            if member.ip not in self.attachments:
                raise AdmissionError(f"{member.ip} is not a host attached to this switch")
            mac, port = self.attachments[member.ip]
            member = Member(member.rank, member.ip, member.udp_port, mac, port)
        with self._lock:
            if job_id in self.jobs.jobs:
                raise _Conflict(f"job {job_id} is already running")
            pending = self._pending.setdefault(job_id, _Pending(world_size))
            if pending.world_size != world_size:
                raise _Conflict(f"job {job_id} has world size {pending.world_size}, "
                                f"not {world_size}")  # fmt: skip
            if not 0 <= member.rank < world_size:
                raise AdmissionError(f"rank {member.rank} out of range for world size {world_size}")
            if member.rank in pending.members:
                raise _Conflict(f"rank {member.rank} of job {job_id} is already registered")
            pending.members[member.rank] = member
            if len(pending.members) == world_size:
                del self._pending[job_id]
                try:
                    pending.job = self.jobs.admit(job_id, list(pending.members.values()),
                                                  self.slot_count)  # fmt: skip
                except Exception as exc:
                    pending.error = exc
                pending.done.set()
        if not pending.done.wait(self.timeout):
            with self._lock:
                pending.members.pop(member.rank, None)
                if not pending.members and self._pending.get(job_id) is pending:
                    del self._pending[job_id]
            missing = sorted(set(range(world_size)) - set(pending.members) - {member.rank})
            raise TimeoutError(f"job {job_id}: ranks {missing} did not register in "
                               f"{self.timeout}s")  # fmt: skip
        if pending.error is not None:
            raise pending.error
        return {
            "job_id": job_id,
            "rank": member.rank,
            "world_size": world_size,
            "slot_count": pending.job.slot_count,
            "k": self.k,
            "switch": self.switch,
        }

    def release(self, job_id: int) -> None:
        with self._lock:
            self.jobs.release(job_id)

    def status(self) -> dict:
        conn = self.jobs.conn
        out = []
        with self._lock:
            pending = {str(job_id): sorted(p.members) for job_id, p in self._pending.items()}
            for job in self.jobs.jobs.values():
                stats = {
                    name: conn.read_counter(f"SwitchReduceIngress.{name}", job.job_id)[0]
                    for name in ("aggregated", "results", "retransmit_replies")
                }
                record = asdict(job)
                record["replica_ids"] = [replica_id(job.job_id, m.rank) for m in job.members]
                record["packets"] = stats
                out.append(record)
            drops = {
                reason.name.lower(): conn.read_counter("SwitchReduceIngress.drops", reason)[0]
                for reason in DropReason
            }
        return {"jobs": out, "pending": pending, "drops": drops}


class _Conflict(ControllerError):
    """The request collides with the state of the job (HTTP 409)."""


def make_server(registry: Registry, address: tuple[str, int]) -> ThreadingHTTPServer:
    """An HTTP server for ``registry``; call serve_forever() (it answers requests in threads)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args) -> None:  # requests are not worth a log line
            pass

        def _reply(self, status: HTTPStatus, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _fail(self, exc: Exception) -> None:
            status = {
                _Conflict: HTTPStatus.CONFLICT,
                AdmissionError: HTTPStatus.BAD_REQUEST,
                TimeoutError: HTTPStatus.GATEWAY_TIMEOUT,
            }.get(type(exc), HTTPStatus.BAD_GATEWAY)  # anything else: the switch refused
            self._reply(status, {"error": str(exc)})

        def do_POST(self) -> None:
            match = _WORKERS.match(self.path)
            if match is None:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no resource {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                member = Member(int(body["rank"]), str(body["ip"]), int(body["udp_port"]),
                                int(body.get("mac", 0)), int(body.get("port", 0)))  # fmt: skip
                world_size, k = int(body["world_size"]), int(body["k"])
            except (KeyError, TypeError, ValueError) as exc:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"bad registration: {exc!r}"})
                return
            try:
                answer = registry.register(int(match[1]), world_size, member, k)
                self._reply(HTTPStatus.OK, answer)
            except Exception as exc:
                self._fail(exc)

        def do_DELETE(self) -> None:
            match = _JOB.match(self.path)
            if match is None:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no resource {self.path}"})
                return
            try:
                registry.release(int(match[1]))
            except AdmissionError as exc:
                self._reply(HTTPStatus.NOT_FOUND, {"error": str(exc)})
                return
            except Exception as exc:
                self._fail(exc)
                return
            self._reply(HTTPStatus.OK, {"released": int(match[1])})

        def do_GET(self) -> None:
            if self.path != "/v1/jobs":
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no resource {self.path}"})
                return
            self._reply(HTTPStatus.OK, registry.status())

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    return server
