"""The I/O shell: one epoll over every port's file descriptor plus one control fd."""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable

from espswitch.datapath import fast
from espswitch.datapath.datapath import Datapath
from espswitch.datapath.ports import Port

_fastpath = fast._fastpath if fast.AVAILABLE else None

BATCH = 32
_ERR = select.EPOLLERR | select.EPOLLHUP
ERROR_LIMIT = 100  # consecutive error wakeups before a port is suspended
SUSPEND = 1.0  # seconds


def _file_id(fd: int) -> tuple[int, int] | None:
    """Which open file `fd` is now (device and inode: every socket and tun file has its
    own), so that a file replaced behind the same number is seen; None if it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class EventLoop:
    """Drains up to BATCH frames per ready port per wakeup and hands them to the datapath.

    A bad frame is the datapath's business (a counted drop); an exception escaping a port
    or the pipeline is caught here, counted and logged with rate limiting, never fatal.
    """

    def __init__(self, dp: Datapath, log_rl: Callable[[str], None] | None = None) -> None:
        self.dp = dp
        self.ep = select.epoll()
        self.fd_ports: dict[int, Port] = {}
        # fd -> the file it was when registered (_file_id): a port that closes its device
        # and opens another in one go usually gets the same fd number back, and the
        # closed file left the epoll set with it
        self._fd_files: dict[int, tuple[int, int] | None] = {}
        self._fd_seq = -1
        self.control_fd: int | None = None
        self.log_rl = log_rl or (lambda msg: None)
        self.exceptions = 0
        self.errors: dict[int, int] = {}
        self.suspended: dict[int, tuple[Port, float]] = {}
        #: run ready batches in the compiled FastLoop when the fast path is on
        self.use_fast_loop = _fastpath is not None
        self._loop: _fastpath.FastLoop | None = None
        self._loop_key: tuple | None = None
        self._ports_version = 0  # moves whenever fd_ports does

    def set_control_fd(self, fd: int | None) -> None:
        """Wake up (and report `True` from poll) when `fd` is readable."""
        if self.control_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(self.control_fd)
        self.control_fd = fd
        if fd is not None:
            self.ep.register(fd, select.EPOLLIN)

    def sync(self) -> None:
        """Follow ports that appeared or went away since the last call."""
        dp = self.dp
        if dp.fd_seq == self._fd_seq:
            return
        self._fd_seq = dp.fd_seq
        self._ports_version += 1
        want = dp.pollable()
        for fd in [fd for fd, (p, _) in self.suspended.items() if want.get(fd) is not p]:
            del self.suspended[fd]
        for fd, port in list(self.fd_ports.items()):
            if want.get(fd) is not port or self._fd_files.get(fd) != _file_id(fd):
                # A closed fd is already gone from the epoll set.
                with contextlib.suppress(OSError, ValueError):
                    self.ep.unregister(fd)
                del self.fd_ports[fd]
                self._fd_files.pop(fd, None)
        for fd, port in want.items():
            if fd not in self.fd_ports:
                try:
                    self.ep.register(fd, select.EPOLLIN)
                except FileExistsError:
                    self.ep.modify(fd, select.EPOLLIN)
                self.fd_ports[fd] = port
                self._fd_files[fd] = _file_id(fd)

    def _suspend(self, fd: int, port: Port) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)
        del self.fd_ports[fd]
        self._fd_files.pop(fd, None)
        self._ports_version += 1
        self.errors.pop(fd, None)
        self.suspended[fd] = (port, time.monotonic() + SUSPEND)
        self.log_rl(f"{port.name}: device keeps failing, not polled for {SUSPEND:.0f} s")

    def _resume(self, now: float) -> None:
        for fd, (port, until) in list(self.suspended.items()):
            if until <= now:
                del self.suspended[fd]
                if self.dp.ports.get(port.name) is port and port.fileno() == fd:
                    self.ep.register(fd, select.EPOLLIN)
                    self.fd_ports[fd] = port
                    self._fd_files[fd] = _file_id(fd)
                    self._ports_version += 1

    def poll(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds, process ready ports; True if control is ready.

        With the compiled fast path, the FastLoop waits and runs the batches its tables
        take whole, without coming back here, until the timeout or until something needs
        Python (see _fastpath.FastLoop)."""
        self.sync()
        if self.use_fast_loop and self._fast_ready():
            return self._poll_fast(timeout)
        try:
            events = self.ep.poll(timeout, 256)
        except InterruptedError:
            return True
        dp = self.dp
        dp.now = time.monotonic()
        control = False
        if self.suspended:
            self._resume(dp.now)
        fd_ports = self.fd_ports
        for fd, ev in events:
            port = fd_ports.get(fd)
            if port is None:
                control = True
                continue
            self._port_ready(fd, ev, port)
        return control

    def _port_ready(self, fd: int, ev: int, port: Port) -> None:
        """Read one batch from a ready port and forward it."""
        dp = self.dp
        try:
            frames = port.receive(BATCH)
            if frames:
                dp.receive(port, frames)
                if fd in self.errors:
                    del self.errors[fd]
            elif ev & _ERR:
                # A pending socket error (ENETDOWN when a link flaps ...) was consumed
                # by the read; only an error that keeps coming suspends the port.
                port.stats["rx_errors"] += 1
                n = self.errors[fd] = self.errors.get(fd, 0) + 1
                if n >= ERROR_LIMIT:
                    self._suspend(fd, port)
        except Exception as e:  # never let one batch end the loop
            self._exception(port, e)

    def _exception(self, port: Port, e: Exception) -> None:
        self.exceptions += 1
        port.stats["rx_errors"] += 1
        self.dp.count_drop("exception")
        self.log_rl(f"{port.name}: error while forwarding: {e!r}")

    # -- the compiled poll loop ------------------------------------------------------------

    def _fast_ready(self) -> bool:
        """Whether the FastLoop can run now: the tables are current (rebuilt here if
        needed) and the loop knows this version of them and of the polled fds."""
        fast = self.dp.fast_tables
        if fast is None:
            return False
        self.dp.now = time.monotonic()
        if not fast.ensure():
            return False
        key = (id(fast), fast.rebuilds, self._ports_version)
        if key != self._loop_key:
            sources = fast.loop_sources(self.fd_ports)
            if not sources:
                self._loop_key = None
                return False
            if self._loop is None:
                self._loop = _fastpath.FastLoop()
            self._loop.configure(fast.table, fast, self.ep.fileno(), sources,
                                 len(fast.ports), len(fast.entries))
            self._loop_key = key
        return True

    def _poll_fast(self, timeout: float) -> bool:
        dp = self.dp
        fast = dp.fast_tables
        loop = self._loop
        deadline = min(time.monotonic() + timeout, fast.valid_until)
        try:
            work = loop.poll(deadline, BATCH, self.errors)
        except Exception as e:  # counted and logged as a port's exception is
            self.exceptions += 1
            dp.count_drop("exception")
            self.log_rl(f"fast loop: error while forwarding: {e!r}")
            work = []
        finally:
            dp.now = time.monotonic()
            fast.fold(loop)
        if self.suspended:
            self._resume(dp.now)
        control = False
        fd_ports = self.fd_ports
        for fd, ev, frames, result in work:
            port = fd_ports.get(fd)
            if port is None:
                control = True
            elif frames is None:
                if ev:
                    self._port_ready(fd, ev, port)
                else:
                    self.errors.pop(fd, None)
            else:
                try:
                    dp.receive(port, frames, result)
                except Exception as e:
                    self._exception(port, e)
        return control

    def close(self) -> None:
        self.ep.close()
