"""The controller's registration API: HTTP/JSON, as SwitchML's session requests.

GET    /v1/switch
    {"data_plane": "host:port", "k", "switch": "available" | "unavailable"}: where workers
    send. A worker connects its socket there first, so that it registers the source
    address its packets will carry (a socket bound to 0.0.0.0 has none until then).
POST   /v1/jobs/{job_id}/workers   {"rank", "world_size", "ip", "udp_port", "k"[, "lane_bits",
    "quorum", "mac", "port"]}
    Every field is checked before anything is held: 400 {"error", "field"} names the
    first bad one. Waits until all ranks of the job have registered, admits the job once
    with a fresh session, then answers every rank: {"job_id", "rank", "world_size",
    "quorum", "slot_count", "k", "lane_bits", "switch": "host:port", "session", "lease"}.
    ``lane_bits`` (32, 16 or 8; 32 if not given) is the job's width of a float element on
    the wire (worker.quantize): the first rank sets it. ``quorum`` (1..world_size; the
    world size if not given) is how many contributions complete a round: the first rank
    sets it. 409 for a rank already taken, a world size, lane width or quorum that
    disagrees or a job already running; 503 when the switch has
    no room now (slots, jobs) or is unavailable; 504 if the others do not come in time
    (the registration is then withdrawn); 502 if the switch refuses the writes. Whatever
    the failure, nothing of the job stays, on the switch or here.
POST   /v1/jobs/{job_id}/lease     {"session"} -> {"job_id", "lease"}: the job's ranks renew
    its lease (each every lease/3 s); a job nobody renews for ``lease`` seconds is
    released, since its workers are gone. 404 for a job not running, 409 for another
    run's session, 410 for a job lost when the switch restarted.
DELETE /v1/jobs/{job_id}/workers/{rank}   {"session"} -> {"job_id", "rank", "released",
    "remaining"}: a rank is done; the last one out releases the job.
DELETE /v1/jobs/{job_id}           release the job at once, whoever runs it (an operator's).
GET    /v1/jobs                    always answers, from what the controller holds:
    {"switch": "available" | "unavailable", "switch_error" (when unavailable),
     "jobs": [{"job_id", "world_size", "quorum", "slot_base", "slot_count", "members",
               "replica_ids",
               "state": "running" | "lost" (with "error"), "ranks" (not yet left),
               "lease_expires_in", "packets": the switch's per-job counters or null}],
     "pending": {job id: ranks registered so far},
     "drops": the switch's drops by reason (switch-wide: most reasons, an unknown job say,
              belong to no job), or null while the switch is unavailable}

A session is a job's secret (wire.new_session): it is told only to the job's ranks,
never listed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from switchreduce import wire
from switchreduce.controller.errors import (
    AdmissionError,
    CapacityError,
    ControllerError,
    NotPrimaryError,
    SwitchUnavailableError,
    UnknownJobError,
    WriteError,
)
from switchreduce.controller.supervisor import SwitchSupervisor
from switchreduce.p4runtime.jobs import Job, Member, replica_id
from switchreduce.p4runtime.names import DROPS, JobStat
from switchreduce.wire import DropReason

log = logging.getLogger(__name__)

_SWITCH = re.compile(r"^/v1/switch$")
_JOBS = re.compile(r"^/v1/jobs$")
_WORKERS = re.compile(r"^/v1/jobs/(\d+)/workers$")
_WORKER = re.compile(r"^/v1/jobs/(\d+)/workers/(\d+)$")
_LEASE = re.compile(r"^/v1/jobs/(\d+)/lease$")
_JOB = re.compile(r"^/v1/jobs/(\d+)$")

#: A registration is a few hundred bytes; anything much larger is not one.
_MAX_BODY = 64 * 1024
_REGISTRATION_FIELDS = (
    "rank", "world_size", "ip", "udp_port", "k", "lane_bits", "quorum", "mac", "port"
)  # fmt: skip


class BadRequest(ControllerError):
    """A request field is missing, mistyped or out of range (HTTP 400); ``field`` names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.field = name


class Conflict(ControllerError):
    """The request collides with the state of the job (HTTP 409)."""


class Gone(ControllerError):
    """The job was lost when the switch restarted (HTTP 410)."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(body: dict, name: str, low: int, high: int, default: int | None = None) -> int:
    """``body[name]`` as an int in low..high; a JSON bool or float (0.9, true) is refused."""
    if name not in body:
        if default is None:
            raise BadRequest(name, "missing")
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise BadRequest(name, f"must be {low}..{high}, got {value}")
    return value


def _path_number(text: str, name: str, low: int, high: int) -> int:
    """A number from the path (digits only, by the route's pattern) in low..high."""
    value = int(text) if len(text) <= 12 else high + 1  # not int() of a megabyte of digits
    if not low <= value <= high:
        raise BadRequest(name, f"must be {low}..{high}, got {_show(text)}")
    return value


def _ipv4(body: dict, name: str) -> str:
    """A dotted IPv4 address packets can come from."""
    if name not in body:
        raise BadRequest(name, "missing")
    value = body[name]
    try:
        if not isinstance(value, str):
            raise ValueError
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise BadRequest(name, f"must be a dotted IPv4 address, got {_show(value)}") from None
    if address.is_unspecified or address.is_multicast or address.packed == b"\xff" * 4:
        raise BadRequest(
            name, f"{value} is no packet's source: register the address the worker sends from"
        )
    return str(address)


def _session(body: dict) -> int:
    return _integer(body, "session", 0, (1 << 64) - 1)


@dataclass(frozen=True)
class Registration:
    """One rank's registration, every field checked."""

    job_id: int
    world_size: int
    member: Member
    k: int
    lane_bits: int = 32
    quorum: int | None = None  # every rank's contribution completes a round


def parse_registration(job_text: str, body: dict, k: int, max_job_id: int) -> Registration:
    """The registration in ``body`` for job ``job_text``, or BadRequest naming a field."""
    job_id = _path_number(job_text, "job_id", 1, max_job_id)
    unknown = sorted(set(body) - set(_REGISTRATION_FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"unknown field (known: {', '.join(_REGISTRATION_FIELDS)})")
    world_size = _integer(body, "world_size", 1, wire.MAX_WORKERS)
    rank = _integer(body, "rank", 0, (1 << 8) - 1)
    if rank >= world_size:
        raise BadRequest(
            "rank", f"must be 0..{world_size - 1} for world size {world_size}, got {rank}"
        )
    ip = _ipv4(body, "ip")
    udp_port = _integer(body, "udp_port", 1, 0xFFFF)
    mac = _integer(body, "mac", 0, (1 << 48) - 1, default=0)
    port = _integer(body, "port", 0, (1 << 9) - 1, default=0)  # bit<9>, v1model's port
    asked = _integer(body, "k", 1, wire.MAX_LENGTH)
    if asked != k:
        raise BadRequest("k", f"the switch runs K={k}, the worker asked for K={asked}")
    lane_bits = _integer(body, "lane_bits", 0, 0xFF, default=32)
    if lane_bits not in wire.LANE_BITS:
        raise BadRequest("lane_bits", f"must be one of {wire.LANE_BITS}, got {lane_bits}")
    quorum = _integer(body, "quorum", 1, world_size, default=world_size)
    member = Member(rank, ip, udp_port, mac, port)
    return Registration(
        job_id, world_size, member, k, lane_bits, None if quorum == world_size else quorum
    )


class _Pending:
    """Registrations of a job not yet admitted."""

    def __init__(self, world_size: int, lane_bits: int, quorum: int | None) -> None:
        self.world_size = world_size
        self.lane_bits = lane_bits
        self.quorum = quorum
        self.members: dict[int, Member] = {}
        self.done = threading.Event()
        self.job: Job | None = None
        self.error: Exception | None = None


@dataclass
class _Lease:
    """How long an admitted job lives without a renewal, and which ranks have not left."""

    deadline: float
    ranks: set[int] = field(default_factory=set)


class Registry:
    """Collects ranks into jobs, admits each job when it is complete, and ends it when its
    ranks leave or stop renewing its lease."""

    def __init__(
        self,
        supervisor: SwitchSupervisor,
        k: int,
        slot_count: int,
        data_plane: str,
        *,
        lease: float = 30.0,
        timeout: float = 30.0,
        attachments: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self.supervisor = supervisor
        #: Where each host is attached (IP -> (MAC, switch port)): workers cannot know it.
        self.attachments = attachments
        self.k = k
        self.slot_count = slot_count
        self.data_plane = data_plane
        self.lease = lease
        self.timeout = timeout
        self.lock = supervisor.lock
        self._pending: dict[int, _Pending] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_all()  # jobs recovered from the switch get one too

    @property
    def max_job_id(self) -> int:
        return self.supervisor.jobs.max_job_id

    def _lease_all(self) -> None:
        """Give every held job without a lease one that starts now (all ranks in)."""
        for job in self.supervisor.jobs.jobs.values():
            if job.job_id not in self._leases:
                ranks = set(range(job.world_size))
                self._leases[job.job_id] = _Lease(time.monotonic() + self.lease, ranks)

    def switch_info(self) -> dict:
        return {
            "data_plane": self.data_plane,
            "k": self.k,
            "switch": "available" if self.supervisor.available else "unavailable",
        }

    def register(self, reg: Registration) -> dict:
        member = self._attached(reg.member)
        jobs = self.supervisor.jobs
        with self.lock:
            if not self.supervisor.available:
                raise SwitchUnavailableError(
                    f"the switch is unavailable: {self.supervisor.problem}; the controller "
                    "re-programs it when it is back: retry then"
                )
            if reg.job_id in jobs.jobs:
                raise Conflict(self._running(reg.job_id))
            pending = self._pending.get(reg.job_id)
            if pending is None:
                jobs.check_capacity(self.slot_count)  # now, not once every rank has waited
                pending = _Pending(reg.world_size, reg.lane_bits, reg.quorum)
            elif pending.world_size != reg.world_size:
                raise Conflict(
                    f"job {reg.job_id} has world size {pending.world_size}, not {reg.world_size}"
                )
            elif pending.lane_bits != reg.lane_bits:
                raise Conflict(
                    f"job {reg.job_id} sends {pending.lane_bits}-bit lanes, not "
                    f"{reg.lane_bits}-bit: every rank of a job must use the same lane width"
                )
            elif pending.quorum != reg.quorum:
                raise Conflict(
                    f"job {reg.job_id} completes a round with {pending.quorum or 'every'} "
                    f"rank(s), not {reg.quorum or 'every'}: every rank must ask the same quorum"
                )
            if member.rank in pending.members:
                raise Conflict(f"rank {member.rank} of job {reg.job_id} is already registered")
            pending.members[member.rank] = member
            self._pending[reg.job_id] = pending
            if len(pending.members) == pending.world_size:
                del self._pending[reg.job_id]
                self._admit(reg.job_id, pending)
        if not pending.done.wait(self.timeout):
            self._withdraw(reg.job_id, member.rank, pending)
        if pending.error is not None:
            raise pending.error
        job = pending.job
        if job is None:  # admission sets one of the two before ``done``
            raise RuntimeError(f"job {reg.job_id} ended admission with neither job nor error")
        return {
            "job_id": job.job_id,
            "rank": member.rank,
            "world_size": job.world_size,
            "quorum": job.contributors,
            "slot_count": job.slot_count,
            "k": self.k,
            "lane_bits": pending.lane_bits,
            "switch": self.data_plane,
            "session": job.session,
            "lease": self.lease,
        }

    def _attached(self, member: Member) -> Member:
        """The member with its switch port and MAC, where the controller was told them."""
        if self.attachments is None:
            return member
        if member.ip not in self.attachments:
            raise BadRequest("ip", f"{member.ip} is not a host attached to this switch")
        mac, port = self.attachments[member.ip]
        return Member(member.rank, member.ip, member.udp_port, mac, port)

    def _running(self, job_id: int) -> str:
        lease = self._leases.get(job_id)
        if lease is None:
            return f"job {job_id} is already running"
        left = max(0.0, lease.deadline - time.monotonic())
        return (
            f"job {job_id} is already running (ranks {sorted(lease.ranks)} have not left; "
            f"its lease ends in {left:.0f} s unless they renew it)"
        )

    def _admit(self, job_id: int, pending: _Pending) -> None:
        """Admit a complete job (under the lock) and wake its ranks."""
        try:
            pending.job = self.supervisor.jobs.admit(
                job_id, list(pending.members.values()), self.slot_count, pending.quorum
            )
        except Exception as exc:
            pending.error = exc
            if isinstance(exc, (SwitchUnavailableError, NotPrimaryError)):
                self.supervisor.suspect()
        else:
            job = pending.job
            self._leases[job_id] = _Lease(time.monotonic() + self.lease, set(range(job.world_size)))
            log.info(
                "job %d admitted: %d ranks, slots %d..%d",
                job_id,
                job.world_size,
                job.slot_base,
                job.slot_base + job.slot_count - 1,
            )
        pending.done.set()

    def _withdraw(self, job_id: int, rank: int, pending: _Pending) -> None:
        """The other ranks did not come: forget this one (unless they came meanwhile)."""
        with self.lock:
            if pending.done.is_set():
                return
            pending.members.pop(rank, None)
            if not pending.members and self._pending.get(job_id) is pending:
                del self._pending[job_id]
            missing = sorted(set(range(pending.world_size)) - set(pending.members) - {rank})
        raise TimeoutError(f"job {job_id}: ranks {missing} did not register in {self.timeout:g} s")

    def _job(self, job_id: int, session: int) -> Job:
        """The running job ``job_id``, if ``session`` is its session (under the lock)."""
        job = self.supervisor.jobs.jobs.get(job_id)
        if job is None:
            raise UnknownJobError(f"job {job_id} is not running (released, or its lease expired)")
        if session != job.session:
            raise Conflict(f"session {session} is not job {job_id}'s: another run holds the job")
        return job

    def renew(self, job_id: int, session: int) -> dict:
        with self.lock:
            self._job(job_id, session)
            lost = self.supervisor.jobs.lost.get(job_id)
            if lost is not None:
                raise Gone(f"job {job_id} was lost: {lost}")
            self._lease_all()
            self._leases[job_id].deadline = time.monotonic() + self.lease
        return {"job_id": job_id, "lease": self.lease}

    def leave(self, job_id: int, rank_text: str, session: int) -> dict:
        with self.lock:
            job = self._job(job_id, session)
            rank = _path_number(rank_text, "rank", 0, job.world_size - 1)
            self._lease_all()
            lease = self._leases[job_id]
            lease.ranks.discard(rank)
            if not lease.ranks:
                self._release(job_id, "its ranks left")
        return {
            "job_id": job_id,
            "rank": rank,
            "released": not lease.ranks,
            "remaining": sorted(lease.ranks),
        }

    def release(self, job_id: int) -> None:
        with self.lock:
            self._release(job_id, "on request")

    def _release(self, job_id: int, why: str) -> None:
        self.supervisor.jobs.release(job_id)
        self._leases.pop(job_id, None)
        log.info("job %d released: %s", job_id, why)

    def reap(self) -> list[int]:
        """Release the jobs whose lease expired; returns their ids."""
        with self.lock:
            self._lease_all()
            now = time.monotonic()
            expired = sorted(j for j, lease in self._leases.items() if lease.deadline <= now)
            for job_id in expired:
                ranks = sorted(self._leases[job_id].ranks)
                self._release(
                    job_id,
                    f"its lease expired: no rank renewed it for "
                    f"{self.lease:g} s (ranks {ranks} never left)",
                )
        return expired

    def run_reaper(self, stop: threading.Event) -> None:
        """Reap expired leases until ``stop``; run in a daemon thread."""
        while not stop.wait(min(1.0, self.lease / 4)):
            try:
                self.reap()
            except Exception:
                log.exception("releasing jobs whose lease expired failed; retrying")

    def status(self) -> dict:
        """What the controller holds, with the switch's counters where it answers."""
        with self.lock:
            jobs = self.supervisor.jobs
            held = sorted(jobs.jobs.values(), key=lambda job: job.job_id)
            lost = dict(jobs.lost)
            leases = {j: (lease.deadline, sorted(lease.ranks)) for j, lease in self._leases.items()}
            pending = {str(job_id): sorted(p.members) for job_id, p in self._pending.items()}
            conn, problem = jobs.conn, self.supervisor.problem
        now = time.monotonic()
        records = []
        for job in held:
            deadline, ranks = leases.get(job.job_id, (now + self.lease, []))
            record = {
                "job_id": job.job_id,
                "world_size": job.world_size,
                "quorum": job.contributors,
                "slot_base": job.slot_base,
                "slot_count": job.slot_count,
                "members": [asdict(m) for m in job.members],
                "replica_ids": [replica_id(job.job_id, m.rank) for m in job.members],
                "state": "lost" if job.job_id in lost else "running",
                "ranks": ranks,
                "lease_expires_in": round(max(0.0, deadline - now), 1),
                "packets": None,
            }
            if job.job_id in lost:
                record["error"] = lost[job.job_id]
            records.append(record)
        drops = None
        if problem is None:
            try:
                for job, record in zip(held, records, strict=True):
                    record["packets"] = {
                        stat.alias: conn.read_counter(stat.counter, job.job_id)[0]
                        for stat in JobStat
                    }
                drops = {
                    reason.name.lower(): conn.read_counter(DROPS, reason)[0]
                    for reason in DropReason
                }
            except Exception as exc:  # gone since the snapshot: say so, and have it checked
                problem = str(exc) or type(exc).__name__
                drops = None
                for record in records:
                    record["packets"] = None
                self.supervisor.suspect()
        out: dict[str, object] = {"switch": "available" if problem is None else "unavailable"}
        if problem is not None:
            out["switch_error"] = problem
        out.update(jobs=records, pending=pending, drops=drops)
        return out


class _NotFound(ControllerError):
    """No such resource (HTTP 404)."""


#: HTTP status per error, most specific first.
_STATUS = (
    (_NotFound, HTTPStatus.NOT_FOUND),
    (BadRequest, HTTPStatus.BAD_REQUEST),
    (Conflict, HTTPStatus.CONFLICT),
    (Gone, HTTPStatus.GONE),
    (UnknownJobError, HTTPStatus.NOT_FOUND),
    (CapacityError, HTTPStatus.SERVICE_UNAVAILABLE),
    (SwitchUnavailableError, HTTPStatus.SERVICE_UNAVAILABLE),
    (NotPrimaryError, HTTPStatus.SERVICE_UNAVAILABLE),
    (AdmissionError, HTTPStatus.BAD_REQUEST),
    (TimeoutError, HTTPStatus.GATEWAY_TIMEOUT),
    (WriteError, HTTPStatus.BAD_GATEWAY),
)


def _error_reply(exc: Exception) -> tuple[HTTPStatus, dict]:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            body = {"error": str(exc)}
            if isinstance(exc, BadRequest):
                body["field"] = exc.field
            return status, body
    log.exception("request failed")
    return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"}


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

        def _body(self) -> dict:
            """The request's JSON object ({} if it has no body)."""
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise BadRequest("body", "Content-Length is not a number") from None
            if not 0 <= length <= _MAX_BODY:
                raise BadRequest("body", f"must be 0..{_MAX_BODY} bytes, got {length}")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as exc:
                raise BadRequest("body", f"not JSON ({exc})") from None
            if not isinstance(body, dict):
                raise BadRequest("body", f"must be a JSON object, got {_show(body)}")
            return body

        def _handle(self, method: str) -> None:
            try:
                status, body = HTTPStatus.OK, self._route(method, urlsplit(self.path).path)
            except Exception as exc:
                status, body = _error_reply(exc)
            try:
                self._reply(status, body)
            except OSError as exc:  # the client went away (a worker killed while it waited)
                log.info("could not answer %s %s: %s", method, self.path, exc)

        def _route(self, method: str, path: str) -> dict:
            if method == "GET" and _JOBS.match(path):
                return registry.status()
            if method == "GET" and _SWITCH.match(path):
                return registry.switch_info()
            if method == "POST" and (match := _WORKERS.match(path)):
                body = self._body()
                reg = parse_registration(match[1], body, registry.k, registry.max_job_id)
                return registry.register(reg)
            if method == "POST" and (match := _LEASE.match(path)):
                return registry.renew(self._job_id(match[1]), _session(self._body()))
            if method == "DELETE" and (match := _WORKER.match(path)):
                return registry.leave(self._job_id(match[1]), match[2], _session(self._body()))
            if method == "DELETE" and (match := _JOB.match(path)):
                job_id = self._job_id(match[1])
                registry.release(job_id)
                return {"released": job_id}
            raise _NotFound(f"no resource {method} {path}")

        def _job_id(self, text: str) -> int:
            return _path_number(text, "job_id", 1, registry.max_job_id)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    return server
