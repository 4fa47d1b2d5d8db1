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
                elif ev & _ERR:
                    port.stats["rx_errors"] += 1
                    self.ep.unregister(fd)
                    del fd_ports[fd]
                    self.log_rl(f"{port.name}: device error, no longer polled")
            except Exception as e:  # never let one batch end the loop
                self.exceptions += 1
                port.stats["rx_errors"] += 1
                dp.count_drop("exception")
                self.log_rl(f"{port.name}: error while forwarding: {e!r}")
        return control

    def close(self) -> None:
        self.ep.close()
