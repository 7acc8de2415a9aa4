"""Starting the project's own commands as child processes, and the lines they speak.

A command that another process starts and waits for speaks one line at a
time on stdout, the first word saying what the line is:

    listening HOST:PORT          a soft switch in UDP mode is up (LISTENING)
    serving PORT=IFNAME ...      a soft switch in raw mode is up (SERVING)
    p4runtime ADDRESS            a soft switch serves P4Runtime there (P4RUNTIME)
    controller http://HOST:PORT  a controller's registration API is up (CONTROLLER)
    ready                        a worker is set up and waits for "go" on stdin (READY, GO)
    {...}                        its last line, when it ends: a JSON report

Everything else a command says is logging, on stderr. The words are named
here once: commands say them with :func:`announce`, and parents (the bench,
the topology, the experiment runner, the tests) read them through
:class:`Child`, which starts every child in a process group of its own and
kills that group by PID whenever the parent leaves the child's ``with``
block by an exception, whatever it is: a child that failed, a timeout,
Ctrl-C, a bug. Nothing is ever killed by name.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import IO, Any, AnyStr

READY = "ready"
GO = "go"
LISTENING = "listening"
SERVING = "serving"
P4RUNTIME = "p4runtime"
CONTROLLER = "controller"

#: Seconds a server has to say it is up.
START_TIMEOUT = 60.0
#: Seconds a child has to end after SIGTERM before it is killed.
STOP_GRACE = 10.0
#: Seconds between looks at whether a child has exited while its pipes stay open.
_POLL = 0.1

#: How a child is started: ``subprocess.Popen``'s signature (a Mininet host's ``popen`` fits).
Starter = Callable[..., "subprocess.Popen[bytes]"]


def cli_command(*args: str) -> list[str]:
    """The command line that runs ``switchreduce ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "switchreduce.cli", *args]


def piped(stream: IO[AnyStr] | None) -> IO[AnyStr]:
    """A child's stdin, stdout or stderr, which is there when it was started with PIPE."""
    if stream is None:
        raise ValueError("the process was started without this stream piped")
    return stream


# -- the child's side ---------------------------------------------------------------


def announce(word: str, *rest: object) -> None:
    """Say a protocol line (one of the words above, then its values) to the parent."""
    print(word, *rest, flush=True)


def print_report(report: Mapping[str, Any]) -> None:
    """End with the report: one JSON object on the last line of stdout."""
    print(json.dumps(report), flush=True)


#: Set by a parent in its children's environment: its PID, so that each child dies with it
#: (``die_with_parent``) even when the parent is killed and cannot stop them.
PARENT_PID = "SWITCHREDUCE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when the parent that started it through
    :class:`Child` dies, however it dies (SIGKILL included). A process started otherwise,
    or whose parent is already gone, is left as it is or ends here."""
    expected = os.environ.pop(PARENT_PID, None)
    if expected is None:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != int(expected):  # the parent died before the request took hold
        raise SystemExit("the parent that started this process is gone")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the block as Ctrl-C would (KeyboardInterrupt), so that whatever it
    started is stopped on the way out instead of being left running."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_go() -> None:
    """Say READY, then wait for a line on stdin (GO); a parent that is gone ends the wait."""
    announce(READY)
    if not sys.stdin.readline():
        raise LaunchError(f"stdin closed before {GO!r}: the parent is gone")


# -- the parent's side --------------------------------------------------------------


class LaunchError(RuntimeError):
    """A child did not come up, did not report, or failed; the message ends with its output."""


class Child:
    """One started child process, in a process group of its own, stopped by its PID.

    Use as a context manager: leaving the block by an exception kills the group
    at once; leaving it normally stops the child (SIGTERM, then SIGKILL after
    ``STOP_GRACE`` seconds) and kills whatever it left in its group.

    ``log``, when given, receives the child's stderr (and its stdout too when
    it does not speak the protocol, ``speaks=False``), so that a long-running
    child never fills a pipe; otherwise stderr is kept for error messages.
    ``popen`` starts it: by default in a new session; a Mininet host's
    ``popen`` runs it under ``mnexec -d``, which starts one itself.
    """

    def __init__(
        self,
        command: Sequence[str],
        name: str,
        *,
        log: Path | None = None,
        stdin: bool = False,
        speaks: bool = True,
        env: Mapping[str, str] | None = None,
        popen: Starter | None = None,
    ) -> None:
        self.name = name
        self.log = log
        #: The stdout lines read so far.
        self.said: list[str] = []
        self._out = bytearray()
        self._err = bytearray()
        self._pos = 0  # where the next unread stdout line starts in _out
        options: dict[str, Any] = {
            "stdin": subprocess.PIPE if stdin else subprocess.DEVNULL,
            "stdout": subprocess.PIPE if speaks else None,
            "stderr": subprocess.PIPE,
            "bufsize": 0,  # unbuffered: select() sees everything the child has written
            "env": {**(os.environ if env is None else env), PARENT_PID: str(os.getpid())},
        }
        with ExitStack() as stack:
            if log is not None:
                options["stderr"] = stack.enter_context(log.open("ab"))
                if not speaks:
                    options["stdout"] = options["stderr"]
            if popen is None:
                self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                    list(command), start_new_session=True, **options
                )
            else:
                self.proc = popen(list(command), **options)
        self._open = {pipe for pipe in (self.proc.stdout, self.proc.stderr) if pipe is not None}

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        """Everything the child has written to stdout so far (as far as it has been read)."""
        return self._out.decode(errors="replace")

    @property
    def errors(self) -> str:
        """What the child has written to stderr so far (its log, when it has one)."""
        if self.log is not None:
            return self.log.read_text(errors="replace") if self.log.exists() else ""
        return self._err.decode(errors="replace")

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.kill()

    @contextmanager
    def killed_on_error(self) -> Iterator[Child]:
        """Kill the child if the block raises; leave it running otherwise."""
        try:
            yield self
        except BaseException:
            self.kill()
            raise

    def wait_for(self, word: str, timeout: float = START_TIMEOUT) -> str:
        """Read stdout up to the first line starting with ``word``; the rest of that line.
        LaunchError if the child ends its output, or ``timeout`` passes, first."""
        return wait_for_all([self], word, timeout)[0]

    def lines(self) -> Iterator[str]:
        """Stdout lines as they come, until the child's output ends."""
        while True:
            while (line := self._next_line()) is not None:
                yield line
            if self._ended():
                return
            _read([self], _POLL)

    def go(self) -> None:
        """Release a child waiting at its start line (it said READY)."""
        try:
            piped(self.proc.stdin).write(f"{GO}\n".encode())
        except BrokenPipeError:
            raise self._failure(f"was gone before {GO!r}") from None

    def finish(self, timeout: float) -> int:
        """Wait for the child to end, reading its output meanwhile; its exit status."""
        deadline = time.monotonic() + timeout
        while not self._ended() or self._open:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(f"did not end within {timeout:g} s")
            _read([self], min(remaining, _POLL))
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise self._failure(f"did not end within {timeout:g} s") from None

    def succeed(self, timeout: float) -> None:
        """Wait for the child to end; LaunchError unless it ended with status 0."""
        if (code := self.finish(timeout)) != 0:
            raise self._failure(f"exited with {code}")

    def report(self, timeout: float) -> dict[str, Any]:
        """Wait for the child to end; the JSON object on its last stdout line."""
        self.finish(timeout)
        lines = self.output.strip().splitlines()
        try:
            report = json.loads(lines[-1])
        except (IndexError, ValueError):
            report = None
        if not isinstance(report, dict):
            raise self._failure("ended without a report")
        return report

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, reading the child's last output; SIGKILL after ``grace`` seconds; then
        whatever it left in its group is killed too. Its exit status."""
        try:
            if self.proc.poll() is None:
                self.signal_group(signal.SIGTERM)
            try:
                return self.finish(grace)
            except LaunchError:
                self.signal_group(signal.SIGKILL)
                return self.proc.wait()
        finally:
            self.signal_group(signal.SIGKILL)
            self._close()

    def kill(self) -> None:
        """SIGKILL to the child's whole group, and reap it."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait()
        self._close()

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group, or to the child alone while it has none
        (``mnexec -d`` calls setsid() after it starts). The group's id is the child's PID,
        which Linux does not give another process while the group has members."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            if self.proc.poll() is None:
                with suppress(ProcessLookupError):
                    self.proc.send_signal(sig)

    def _next_line(self) -> str | None:
        """The next whole stdout line already read, if there is one."""
        end = self._out.find(b"\n", self._pos)
        if end < 0:
            return None
        line = self._out[self._pos : end].decode(errors="replace").rstrip("\r")
        self._pos = end + 1
        self.said.append(line)
        return line

    def _ended(self) -> bool:
        """Whether the child's stdout has ended. Once the child has exited, what it wrote is
        taken and its pipes are let go: a descendant may hold them open, but the child has
        said all it will."""
        if self._open and self.proc.poll() is not None:
            while self._open and select.select(list(self._open), [], [], 0)[0]:
                _read([self], 0)
            self._open.clear()
        return self.proc.stdout not in self._open

    def _failure(self, what: str) -> LaunchError:
        """What went wrong, with the child's exit status and the tail of its stderr."""
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)  # a child whose output ended is about to exit
        self._ended()  # its last words
        code = self.proc.poll()
        status = "still running" if code is None else f"exit status {code}"
        tail = self.errors.strip()[-2000:]
        return LaunchError(f"{self.name} {what} ({status})" + (f":\n{tail}" if tail else ""))

    def _take(self, pipe: IO[bytes]) -> None:
        """Read what has arrived on one of the child's pipes; close it at its end."""
        data = os.read(pipe.fileno(), 1 << 16)
        if not data:
            self._open.discard(pipe)
            pipe.close()
        elif pipe is self.proc.stdout:
            self._out += data
        else:
            self._err += data

    def _close(self) -> None:
        self._open.clear()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with suppress(OSError):
                    pipe.close()


def _read(children: Sequence[Child], timeout: float | None) -> None:
    """Wait up to ``timeout`` for output from any of ``children``; take what has arrived."""
    owners = {pipe: child for child in children for pipe in child._open}
    if not owners:
        return
    ready, _, _ = select.select(list(owners), [], [], timeout)
    for pipe in ready:
        owners[pipe]._take(pipe)


def wait_for_all(children: Sequence[Child], word: str, timeout: float) -> list[str]:
    """Each child's first stdout line starting with ``word`` (the rest of it), waiting for
    all at once: the first child to end without saying it fails the wait."""
    deadline = time.monotonic() + timeout
    found: dict[int, str] = {}
    while True:
        for i, child in enumerate(children):
            if i in found:
                continue
            ended = child._ended()  # before the lines: what it said last is read with it
            while (line := child._next_line()) is not None:
                first, _, rest = line.partition(" ")
                if first == word:
                    found[i] = rest
                    break
            else:
                if ended:
                    raise child._failure(f"ended before saying {word!r}")
        if len(found) == len(children):
            return [found[i] for i in range(len(children))]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            late = next(child for i, child in enumerate(children) if i not in found)
            raise late._failure(f"did not say {word!r} within {timeout:g} s")
        _read([c for i, c in enumerate(children) if i not in found], min(remaining, _POLL))


def release(children: Sequence[Child], timeout: float) -> None:
    """Wait until every child is READY, then send each GO, so that they start together."""
    wait_for_all(children, READY, timeout)
    for child in children:
        child.go()


def reports(children: Sequence[Child], timeout: float) -> list[dict[str, Any]]:
    """Every child's final JSON report, all within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    return [child.report(max(0.0, deadline - time.monotonic())) for child in children]
