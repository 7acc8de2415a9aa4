"""Jobs installed from the command line, into the tables the controller writes.

This is the control plane's job written down statically: one ``jobs`` entry,
one ``workers`` entry per rank binding its source address, one multicast
group with a replica per rank, and one ``result_rewrite`` entry per replica.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from emulation.softswitch.pipeline import SoftSwitch
from emulation.softswitch.tables import ActionCall
from switchreduce import wire


@dataclass(frozen=True)
class WorkerEndpoint:
    """Where rank ``rank`` sends from and receives results (port 0 in UDP mode)."""

    rank: int
    ip: str
    udp_port: int
    mac: int = 0
    port: int = 0

    @classmethod
    def parse(cls, spec: str) -> WorkerEndpoint:
        """``RANK=IP:UDP_PORT`` (UDP mode) or ``RANK=IP:UDP_PORT@SWITCH_PORT/MAC`` (raw mode)."""
        try:
            rank, address = spec.split("=", 1)
            address, _, attachment = address.partition("@")
            ip, udp_port = address.rsplit(":", 1)
            ipaddress.IPv4Address(ip)
            port, mac = 0, 0
            if attachment:
                port_text, mac_text = attachment.split("/", 1)
                port, mac = int(port_text), parse_mac(mac_text)
            return cls(int(rank), ip, int(udp_port), mac=mac, port=port)
        except ValueError as exc:
            raise ValueError(
                f"worker must be RANK=IP:PORT or RANK=IP:PORT@SWITCH_PORT/MAC, got {spec!r} ({exc})"
            ) from None


@dataclass(frozen=True)
class StaticJob:
    job_id: int
    world_size: int
    slot_base: int
    slot_count: int
    workers: tuple[WorkerEndpoint, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.job_id < 2**11:
            raise ValueError(
                f"job id must be 1..{2**11 - 1} (it names replicas), got {self.job_id}"
            )
        if not 1 <= self.world_size <= wire.MAX_WORKERS:
            raise ValueError(f"world size must be 1..{wire.MAX_WORKERS}, got {self.world_size}")
        ranks = sorted(w.rank for w in self.workers)
        if ranks != list(range(self.world_size)):
            raise ValueError(f"job {self.job_id} needs ranks 0..{self.world_size - 1}, got {ranks}")


def parse_mac(text: str) -> int:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return int("".join(parts), 16)


def install_forwarding(switch: SoftSwitch, routes: dict[int, int]) -> None:
    """One ``forward`` entry per host: destination MAC -> switch port."""
    for mac, port in routes.items():
        switch.ingress.forward.insert(
            (mac,), ActionCall("SwitchReduceIngress.set_egress_port", (port,))
        )


def replica_id(job_id: int, rank: int) -> int:
    """The multicast replica id (egress_rid) naming one rank of one job; never 0."""
    return job_id * wire.MAX_WORKERS + rank


def install_static_job(switch: SoftSwitch, job: StaticJob) -> None:
    if job.slot_base + job.slot_count > switch.ingress.pool_size:
        raise ValueError(
            f"slots {job.slot_base}..{job.slot_base + job.slot_count - 1} exceed the pool "
            f"of {switch.ingress.pool_size}"
        )
    ingress = switch.ingress
    ingress.jobs.insert(
        (job.job_id,),
        ActionCall(
            "SwitchReduceIngress.set_job",
            (job.world_size, job.slot_base, job.slot_count, job.job_id, job.job_id),
        ),
    )
    replicas = []
    for w in job.workers:
        ip = int(ipaddress.IPv4Address(w.ip))
        ingress.workers.insert(
            (job.job_id, w.rank, w.port, ip, w.udp_port),
            ActionCall("SwitchReduceIngress.admit_worker"),
        )
        rid = replica_id(job.job_id, w.rank)
        switch.egress.result_rewrite.insert(
            (rid,), ActionCall("SwitchReduceEgress.rewrite_destination", (w.mac, ip, w.udp_port))
        )
        replicas.append((w.port, rid))
    switch.pre.groups[job.job_id] = tuple(replicas)
