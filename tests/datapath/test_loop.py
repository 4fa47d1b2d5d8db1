"""The epoll shell: batches from file descriptors, exceptions contained."""

from __future__ import annotations

import os
import socket

import pytest

from espswitch.datapath import Datapath, Port
from espswitch.datapath.devices import MemoryDevices
from espswitch.datapath.loop import BATCH, EventLoop
from espswitch.datapath.ports import PORT_TYPES, register_port_type

from .helpers import BCAST, eth, mac


class SocketPort(Port):
    """A port on one end of a socketpair: the test writes frames into the other end."""

    def open(self) -> None:
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, limit: int = 32) -> list[bytes]:
        out = []
        for _ in range(limit):
            try:
                out.append(self.sock.recv(2048))
            except BlockingIOError:
                break
        return out

    def send(self, frames: list[bytes]) -> None:
        for f in frames:
            self.sock.send(f)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


@pytest.fixture
def dp():
    register_port_type("test-socket")(SocketPort)
    d = Datapath(MemoryDevices())
    d.add_bridge("br0")
    d.add_port("br0", "s1", "test-socket")
    d.add_port("br0", "p2", "tap")
    yield d
    d.close()
    del PORT_TYPES["test-socket"]


def test_one_batch_per_port_per_wakeup(dp):
    loop = EventLoop(dp)
    s1 = dp.ports["s1"]
    frames = [eth(BCAST, mac(1), bytes([i % 256]) * 46) for i in range(BATCH + 8)]
    for f in frames:
        s1.peer.send(f)
    loop.poll(1.0)
    got = dp.devices.devices["p2"].take()
    assert got == frames[:BATCH]
    loop.poll(1.0)
    assert dp.devices.devices["p2"].take() == frames[BATCH:]
    # Frames sent back out of the socket port arrive at its peer.
    dp.receive(dp.ports["p2"], [eth(mac(1), mac(2))])
    assert s1.peer.recv(2048) == eth(mac(1), mac(2))
    loop.close()


def test_exception_in_the_pipeline_is_contained(dp):
    logged = []
    loop = EventLoop(dp, log_rl=logged.append)
    s1 = dp.ports["s1"]

    def broken(*args, **kw):
        raise RuntimeError("bug")

    dp.bridges["br0"].process = broken
    s1.peer.send(eth(BCAST, mac(1)))
    loop.poll(1.0)
    assert loop.exceptions == 1 and s1.stats["rx_errors"] == 1
    assert dp.drops["exception"] == 1 and "bug" in logged[0]
    del dp.bridges["br0"].process
    s1.peer.send(eth(BCAST, mac(1)))
    loop.poll(1.0)
    assert len(dp.devices.devices["p2"].take()) == 1
    loop.close()


def test_removed_ports_are_no_longer_polled(dp):
    loop = EventLoop(dp)
    loop.poll(0)
    assert set(loop.fd_ports.values()) == {dp.ports["s1"]}
    dp.del_port("s1")
    loop.poll(0)
    assert loop.fd_ports == {}
    loop.close()


def test_a_port_that_reopens_its_device_on_the_same_fd_number_is_polled_again(dp):
    """A NIC opened again (its MTU outgrew the ring, or it came back) usually gets the
    closed socket's fd number, and the closed socket left the epoll set: the loop must see
    that the file changed and register the new one."""
    loop = EventLoop(dp)
    s1 = dp.ports["s1"]
    loop.poll(0)
    fd = s1.fileno()
    # Open the new socket pair on the old number, as close-then-open does.
    new_sock, new_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s1.sock.close()
    s1.peer.close()
    os.dup2(new_sock.fileno(), fd)
    new_sock.close()
    s1.sock = socket.socket(fileno=fd)
    s1.sock.setblocking(False)
    s1.peer = new_peer
    assert s1.fileno() == fd
    dp.fd_seq += 1  # what PortContext.pollables_changed does
    frame = eth(BCAST, mac(1), b"\x01" * 46)
    s1.peer.send(frame)
    loop.poll(1.0)
    assert dp.devices.devices["p2"].take() == [frame]
    loop.close()
