"""The I/O shell: one epoll over every port's file descriptor plus one control fd."""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable

from espswitch.datapath.datapath import Datapath
from espswitch.datapath.ports import Port

BATCH = 32
_ERR = select.EPOLLERR | select.EPOLLHUP
ERROR_LIMIT = 100  # consecutive error wakeups before a port is suspended
SUSPEND = 1.0  # seconds


class EventLoop:
    """Drains up to BATCH frames per ready port per wakeup and hands them to the datapath.

    A bad frame is the datapath's business (a counted drop); an exception escaping a port
    or the pipeline is caught here, counted and logged with rate limiting, never fatal.
    """

    def __init__(self, dp: Datapath, log_rl: Callable[[str], None] | None = None) -> None:
        self.dp = dp
        self.ep = select.epoll()
        self.fd_ports: dict[int, Port] = {}
        self._fd_seq = -1
        self.control_fd: int | None = None
        self.log_rl = log_rl or (lambda msg: None)
        self.exceptions = 0
        self.errors: dict[int, int] = {}
        self.suspended: dict[int, tuple[Port, float]] = {}

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
        want = dp.pollable()
        for fd in [fd for fd, (p, _) in self.suspended.items() if want.get(fd) is not p]:
            del self.suspended[fd]
        for fd, port in list(self.fd_ports.items()):
            if want.get(fd) is not port:
                # A closed fd is already gone from the epoll set.
                with contextlib.suppress(OSError, ValueError):
                    self.ep.unregister(fd)
                del self.fd_ports[fd]
        for fd, port in want.items():
            if fd not in self.fd_ports:
                try:
                    self.ep.register(fd, select.EPOLLIN)
                except FileExistsError:
                    self.ep.modify(fd, select.EPOLLIN)
                self.fd_ports[fd] = port

    def _suspend(self, fd: int, port: Port) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)
        del self.fd_ports[fd]
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

    def poll(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds, process ready ports; True if control is ready."""
        self.sync()
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
                self.exceptions += 1
                port.stats["rx_errors"] += 1
                dp.count_drop("exception")
                self.log_rl(f"{port.name}: error while forwarding: {e!r}")
        return control

    def close(self) -> None:
        self.ep.close()
