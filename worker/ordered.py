"""Calls run one at a time, in the order they were made, on one background thread.

The switch's slot rounds need every rank to send its tensors in the same
order (worker.window), so an asynchronous allreduce queues its transfers for
a single thread instead of running them side by side: a rank's calls reach
the switch in the order it made them, which is the same on every rank when
the callers agree (DDP's buckets come in the same order everywhere). The
caller gets a future at once; ``torch.futures.Future`` and
``concurrent.futures.Future`` both complete through ``set_result`` and
``set_exception``, so either can carry a result.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from switchreduce.worker.errors import WorkerError

T = TypeVar("T")


class Completion(Protocol):
    """Where a call's outcome goes: a torch or a concurrent.futures future."""

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: Any, /) -> None: ...


class ClosedError(WorkerError):
    """The communicator was closed before this allreduce started."""


class OrderedExecutor:
    """One background thread running submitted calls in submission order.

    The thread starts with the first submission, so a communicator used only
    synchronously never has one. ``close`` fails the calls not yet started
    with :class:`ClosedError`, waits for the one running (a transfer ends
    within the communicator's timeout, with its result or an error) and
    joins the thread.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Completion] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending = 0  # submitted and not yet completed
        self._closed = False

    def submit(self, call: Callable[[], Any], completion: Completion) -> None:
        """Run ``call`` after every call submitted before it; its outcome goes to ``completion``."""
        with self._lock:
            self._check_open()
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            self._pending += 1
            self._queue.put((call, completion))

    def run(self, call: Callable[[], T]) -> T:
        """``call()`` in its turn: at once in this thread when nothing is pending, else behind
        the pending calls, waiting for its outcome. One thread drives an executor: a call
        submitted from elsewhere while this one runs in place would run beside it."""
        with self._lock:
            self._check_open()
            in_place = self._pending == 0
        if in_place:
            return call()
        if threading.current_thread() is self._thread:  # e.g. from a future's callback
            raise RuntimeError(
                f"{self._name}: a synchronous allreduce on the communicator's own thread (from "
                f"a future's callback) would wait for the calls queued behind it; use "
                f"allreduce_async there"
            )
        future: Future[T] = Future()
        future.set_running_or_notify_cancel()
        self.submit(call, future)
        return future.result()

    def close(self) -> None:
        """Fail what has not started, let the running call finish, and stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None:
            thread.join()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self._name}: the communicator is closed")

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            call, completion = item
            try:
                if self._closed:
                    raise ClosedError(
                        f"{self._name}: the communicator was closed before this allreduce started"
                    )
                result = call()
            except BaseException as exc:  # the caller's future carries it, whatever it is
                self._settle(completion.set_exception, exc)
            else:
                self._settle(completion.set_result, result)

    def _settle(self, complete: Callable[[Any], None], outcome: Any) -> None:
        with self._lock:
            self._pending -= 1
        complete(outcome)
