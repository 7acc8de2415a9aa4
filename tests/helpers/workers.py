"""Worker processes on loopback as users start them (``switchreduce worker``), through launch.

Each rank is a :class:`~switchreduce.launch.Child`, so a test that fails leaves none
running, and ranks started with ``wait_for_go`` are let go together by ``launch.release``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from switchreduce.launch import Child, cli_command, reports


@contextmanager
def loopback_workers(
    switch: str, ports: Sequence[int], *options: str, wait_for_go: bool = False
) -> Iterator[list[Child]]:
    """One ``switchreduce worker`` per port, rank ``i`` bound to ``127.0.0.1:ports[i]``, for
    the static job of the switch at ``switch``; ``options`` are the rest of its command line."""
    go = ("--wait-for-go",) if wait_for_go else ()
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                Child(
                    cli_command(
                        "worker", "--switch", switch, "--bind", f"127.0.0.1:{port}",
                        "--rank", str(rank), "--world-size", str(len(ports)), *options, *go,
                    ),
                    f"worker rank {rank}",
                    stdin=wait_for_go,
                )
            )
            for rank, port in enumerate(ports)
        ]  # fmt: skip


def assert_exact(workers: Sequence[Child], timeout: float) -> None:
    """Every worker ends with status 0 and a report saying its sum was exact."""
    for worker, report in zip(workers, reports(workers, timeout), strict=True):
        assert worker.proc.returncode == 0 and report["exact"], (worker.output, worker.errors)
