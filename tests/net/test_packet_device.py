"""The NIC's AF_PACKET device (datapath/devices.py PacketSocketDevice) on a real veth pair:
frames received come from the ring of its receiving socket, and frames sent leave through a
second socket that receives nothing, so that the kernel's per-frame write-space callback
never meets the receiving socket's epoll entry."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.net

DRIVER = r'''
import socket, subprocess, sys, time
from espswitch.datapath.devices import PacketSocketDevice

def ip(*a):
    subprocess.run(["ip", *a], check=True)

ip("link", "add", "nic0", "type", "veth", "peer", "name", "wire0")
ip("link", "set", "wire0", "up")
dev = PacketSocketDevice("nic0")
wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
wire.bind(("wire0", 3))
wire.settimeout(5)

def frame(tag):
    return b"\x02" * 6 + dev.mac + b"\x88\xb5" + tag + bytes(60 - 14 - len(tag))

def await_on_wire(tag):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = wire.recv(2048)
        if tag in got:
            return got
    raise SystemExit(f"{tag!r} never reached the wire")

# Sent: through the second socket, onto the wire.
assert dev.tx_sock is not dev.sock, "sends share the receiving socket"
kind, fd = dev.fast_output() or (None, dev.tx_sock.fileno())
assert fd == dev.tx_sock.fileno() and fd != dev.fileno(), (fd, dev.fileno())
sent, dropped, too_big = dev.send([frame(b"from-dev")])
assert (sent, dropped, too_big) == (1, [], []), (sent, dropped, too_big)
assert await_on_wire(b"from-dev") == frame(b"from-dev")

# Received: on the device's own socket (its ring), not on the sending one.
wire.send(frame(b"to-dev"))
deadline, got = time.monotonic() + 5, []
while not got and time.monotonic() < deadline:
    got = [f for f in dev.recv_batch(8) if b"to-dev" in f]
    time.sleep(0.01)
assert got == [frame(b"to-dev")], got
try:
    leaked = dev.tx_sock.recv(2048)
except BlockingIOError:
    leaked = None
assert leaked is None, "the sending socket receives frames"
# The kernel lists it without a receive hook: protocol 0, not running.
rows = [l.split() for l in open("/proc/net/packet").read().splitlines()[1:]]
ino = str(__import__("os").fstat(dev.tx_sock.fileno()).st_ino)
mine = [r for r in rows if r[-1] == ino]
assert mine and mine[0][3] == "0000" and mine[0][5] == "0", mine
dev.close()
print("ok")
'''



def test_nic_sends_through_a_socket_that_receives_nothing_and_receives_on_its_ring(netns):
    p = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", DRIVER],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr
