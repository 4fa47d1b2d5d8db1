"""The IKE socket driver: UDP ports 500 and 4500 for an `IkeCore`, the only socket code of
the IKE layer.

`IkeSockets` is the driver espswitchd runs in its poll loop (`espswitch.vswitchd.ike`): two
non-blocking sockets, bound to the wildcard address with IP_PKTINFO so that each datagram's
destination is learnt and each reply leaves from the address it is addressed from (or
adopted, already bound, from the caller). It reads datagrams and writes the core's; it
never decides anything. `IkeDriver` runs the same sockets on an asyncio loop (the
strongSwan interop tests and the IKE benchmark): readers, a timer at the core's next
deadline, events to a callback, and ESP on port 4500 handed to `on_esp`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator

from espswitch.ike.consts import IKE_PORT, NAT_T_PORT
from espswitch.ike.core import IkeCore
from espswitch.ike.events import Datagram, Event
from espswitch.packet.errors import PacketError
from espswitch.packet.esp import UdpEncapKind, split_udp_encap

__all__ = ["IkeDriver", "IkeSockets", "bind_udp", "bind_wildcard"]

log = logging.getLogger("espswitch.ike")

IP_PKTINFO = 8  # <linux/in.h>; Python's socket module does not export it
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
RECV_BATCH = 64  # datagrams read from one socket per `received` call


def bind_wildcard(port: int) -> socket.socket:
    """A non-blocking UDP socket on 0.0.0.0:`port` that reports each datagram's destination."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def bind_udp(addr: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to (addr, port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.setblocking(False)
    return s


class IkeSockets:
    """UDP ports 500 and 4500: `open` binds them with `bind(port)` (or adopts sockets),
    `received` reads datagrams with their destination, `send` writes the core's."""

    def __init__(self, bind: Callable[[int], socket.socket] = bind_wildcard,
                 debug: Callable[[str], None] = log.debug) -> None:
        self._bind = bind
        self._debug = debug  # where a socket error while reading is told
        self.sockets: dict[int, socket.socket] = {}

    def open(self, adopt: dict[int, socket.socket] | None = None) -> None:
        """Bind (or adopt) both ports; OSError, with none left open, if one cannot be."""
        try:
            for port in (IKE_PORT, NAT_T_PORT):
                self.open_port(port, (adopt or {}).get(port))
        except OSError:
            self.close()
            raise

    def open_port(self, port: int, sock: socket.socket | None = None) -> None:
        """Bind `port` (or adopt `sock`, already bound to it); OSError if it cannot be."""
        if sock is None:
            sock = self._bind(port)
        else:
            # Learn each datagram's destination on adopted sockets too.
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.sockets[port] = sock

    def close(self) -> None:
        """Close the sockets."""
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()

    def received(self, port: int,
                 batch: int = RECV_BATCH) -> Iterator[tuple[bytes, tuple[str, int],
                                                             tuple[str, int]]]:
        """Up to `batch` datagrams waiting on `port`, as (data, source, destination)."""
        s = self.sockets.get(port)
        if s is None:
            return
        for _ in range(batch):
            try:
                data, anc, _flags, src = s.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error on the socket and the like
                self._debug(f"UDP {port}: {e}")
                continue
            dst = None
            for level, kind, cdata in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and \
                        len(cdata) >= _PKTINFO.size:
                    dst = socket.inet_ntoa(_PKTINFO.unpack_from(cdata)[2])
            if dst is None:
                continue
            yield data, src, (dst, port)

    def send(self, datagrams: Iterable[Datagram]) -> list[str]:
        """Send each datagram from its source address and port; what failed, as text."""
        errors = []
        for d in datagrams:
            s = self.sockets.get(d.src[1])
            if s is None:
                continue
            info = _PKTINFO.pack(0, socket.inet_aton(d.src[0]), b"\0\0\0\0")
            try:
                s.sendmsg([d.data], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, d.dst)
            except OSError as e:
                errors.append(f"cannot send to {d.dst[0]}:{d.dst[1]}: {e.strerror or e}")
        return errors


class IkeDriver:
    """Runs `core` on UDP 500/4500 of `local_addr` (or on the given bound sockets) on the
    running asyncio loop, with `IkeSockets`.

    Events go to `on_event` and to the `events` queue. Datagrams on port 4500 that are ESP
    (not the non-ESP marker, not a keepalive) go to `on_esp(payload, src)`, and `send_esp`
    sends UDP-encapsulated ESP from port 4500.
    """

    def __init__(self, core: IkeCore, local_addr: str, *,
                 sockets: dict[int, socket.socket] | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 on_esp: Callable[[bytes, tuple[str, int]], None] | None = None) -> None:
        self.core = core
        self.local_addr = local_addr
        self.on_event = on_event
        self.on_esp = on_esp
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._adopt = sockets
        self._io = IkeSockets(lambda port: bind_udp(local_addr, port))
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind (or adopt) the sockets and start serving."""
        self._loop = asyncio.get_running_loop()
        self._io.open(self._adopt)
        for port, sock in self._io.sockets.items():
            self._loop.add_reader(sock.fileno(), self._readable, port)
        self._flush()

    def close(self) -> None:
        """Stop serving and close the sockets."""
        if self._timer is not None:
            self._timer.cancel()
        if self._loop is not None:
            for sock in self._io.sockets.values():
                self._loop.remove_reader(sock.fileno())
        self._io.close()

    @property
    def now(self) -> float:
        """The driver's clock, as given to the core."""
        return self._loop.time()

    # -- commands ---------------------------------------------------------------------------

    def initiate(self, peer: str) -> None:
        """Start an IKE SA with `peer`."""
        self.core.initiate(peer, self.now)
        self._flush()

    def rekey_child(self, peer: str, child: str | None = None) -> None:
        """Rekey a CHILD_SA."""
        self.core.rekey_child(peer, self.now, child)
        self._flush()

    def rekey_ike(self, peer: str) -> None:
        """Rekey the IKE SA."""
        self.core.rekey_ike(peer, self.now)
        self._flush()

    def delete_child(self, peer: str, child: str | None = None) -> None:
        """Delete a CHILD_SA."""
        self.core.delete_child(peer, self.now, child)
        self._flush()

    def delete_ike(self, peer: str) -> None:
        """Delete the IKE SA(s) with `peer`."""
        self.core.delete_ike(peer, self.now)
        self._flush()

    def send_esp(self, esp: bytes, dst: tuple[str, int]) -> None:
        """Send one UDP-encapsulated ESP packet from port 4500."""
        self._io.send([Datagram(data=esp, src=(self.local_addr, NAT_T_PORT), dst=dst)])

    # -- plumbing ---------------------------------------------------------------------------

    def _readable(self, port: int) -> None:
        for data, src, dst in self._io.received(port):
            self._datagram(data, src, dst)

    def _datagram(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        if dst[1] == NAT_T_PORT:
            try:
                kind = split_udp_encap(data)
            except PacketError:
                return
            if kind is UdpEncapKind.ESP:
                if self.on_esp is not None:
                    self.on_esp(data, src)
                return
            if kind is UdpEncapKind.KEEPALIVE:
                return
        self.core.receive_datagram(data, src=src, dst=dst, now=self.now)
        self._flush()

    def _flush(self) -> None:
        for err in self._io.send(self.core.datagrams_to_send()):
            log.debug("IKE: %s", err)
        while (ev := self.core.next_event()) is not None:
            log.info("IKE event: %r", ev)
            if self.on_event is not None:
                self.on_event(ev)
            self.events.put_nowait(ev)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.core.next_deadline()
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(max(deadline, self.now), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.core.on_timer(self.now)
        self._flush()
