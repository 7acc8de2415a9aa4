"""Ranks of a test, each in a thread of its own, as ranks run at once in a real job."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def in_threads(count: int, work: Callable[[int], object]) -> list[Any]:
    """``work(rank)`` for every rank at once; each rank's result or the exception it raised."""
    results: list[Any] = [None] * count

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except BaseException as exc:
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def each_rank(count: int, work: Callable[[int], object]) -> list[Any]:
    """``work(rank)`` for every rank at once; their results, or the lowest rank's exception."""
    results = in_threads(count, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
