"""The IKE socket driver: UDP ports 500 and 4500 for an `IkeCore`, over IPv4 and IPv6, the
only socket code of the IKE layer.

`IkeSockets` is the driver espswitchd runs in its poll loop (`espswitch.vswitchd.ike`): two
non-blocking sockets a family, bound to the wildcard address with IP_PKTINFO (IPv6:
IPV6_RECVPKTINFO, and IPV6_V6ONLY so that each family has its own socket) so that each
datagram's destination is learnt and each reply leaves from the address it is addressed
from (or adopted, already bound, from the caller). It reads datagrams and writes the
core's; it never decides anything. Addresses reach the core as the core spells them (RFC
5952 for IPv6, no scope). `IkeDriver` runs the same sockets on an asyncio loop (the
strongSwan interop tests and the IKE benchmark): readers, a timer at the core's next
deadline, events to a callback, and ESP on port 4500 handed to `on_esp`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator

from espswitch.ike.addr import canonical, is_v6
from espswitch.ike.consts import IKE_PORT, NAT_T_PORT
from espswitch.ike.core import IkeCore
from espswitch.ike.events import Datagram, Event
from espswitch.packet.errors import PacketError
from espswitch.packet.esp import UdpEncapKind, split_udp_encap

__all__ = ["IkeDriver", "IkeSockets", "SockKey", "bind_udp", "bind_wildcard", "family_of"]

log = logging.getLogger("espswitch.ike")

IP_PKTINFO = 8  # <linux/in.h>; Python's socket module does not export it
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_PKTINFO6 = struct.Struct("=16sI")  # struct in6_pktinfo: addr, ifindex
RECV_BATCH = 64  # datagrams read from one socket per `received` call
#: A socket by (address family, UDP port): (AF_INET, 500), (AF_INET6, 4500), ...
SockKey = tuple[int, int]


def family_of(addr: str) -> int:
    """AF_INET or AF_INET6, by the address's text."""
    return socket.AF_INET6 if is_v6(addr) else socket.AF_INET


def _want_pktinfo(s: socket.socket) -> None:
    """Have `s` report each datagram's destination address."""
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def bind_wildcard(port: int, family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking UDP socket on the wildcard address (0.0.0.0 or ::, IPv6 only) of
    `port` that reports each datagram's destination."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _want_pktinfo(s)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def bind_udp(addr: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to (addr, port), IPv4 or IPv6 by `addr`."""
    s = socket.socket(family_of(addr), socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _destination(anc: list[tuple[int, int, bytes]]) -> str | None:
    """The destination address an IP_PKTINFO or IPV6_PKTINFO control message tells."""
    for level, kind, cdata in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(cdata) >= _PKTINFO.size:
            return socket.inet_ntoa(_PKTINFO.unpack_from(cdata)[2])
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and \
                len(cdata) >= _PKTINFO6.size:
            return canonical(socket.inet_ntop(socket.AF_INET6, _PKTINFO6.unpack_from(cdata)[0]))
    return None


class IkeSockets:
    """UDP ports 500 and 4500 of each address family in use: `open` binds them with
    `bind(port, family)` (or adopts sockets), `received` reads datagrams with their
    destination, `send` writes the core's from the socket of their source's family."""

    def __init__(self, bind: Callable[[int, int], socket.socket] = bind_wildcard,
                 debug: Callable[[str], None] = log.debug) -> None:
        self._bind = bind
        self._debug = debug  # where a socket error while reading is told
        self.sockets: dict[SockKey, socket.socket] = {}

    def open(self, adopt: dict[int, socket.socket] | None = None,
             family: int = socket.AF_INET) -> None:
        """Bind (or adopt, by port) both ports of `family`; OSError, with none of that
        family left open, if one cannot be."""
        try:
            for port in (IKE_PORT, NAT_T_PORT):
                self.open_port(port, (adopt or {}).get(port), family)
        except OSError:
            self.close(family)
            raise

    def open_port(self, port: int, sock: socket.socket | None = None,
                  family: int = socket.AF_INET) -> None:
        """Bind `port` (or adopt `sock`, already bound to it); OSError if it cannot be."""
        if sock is None:
            sock = self._bind(port, family)
        # Learn each datagram's destination on adopted sockets too, and on those of a
        # `bind` that did not ask for it (`received` skips a datagram without it).
        _want_pktinfo(sock)
        self.sockets[(sock.family, port)] = sock

    def families(self) -> set[int]:
        """The address families with both ports open."""
        return {f for f, _ in self.sockets
                if all((f, p) in self.sockets for p in (IKE_PORT, NAT_T_PORT))}

    def close(self, family: int | None = None) -> None:
        """Close the sockets (of one family, or all)."""
        for key in [k for k in self.sockets if family is None or k[0] == family]:
            self.sockets.pop(key).close()

    def received(self, key: SockKey,
                 batch: int = RECV_BATCH) -> Iterator[tuple[bytes, tuple[str, int],
                                                             tuple[str, int]]]:
        """Up to `batch` datagrams waiting on socket `key`, as (data, source, destination)."""
        s = self.sockets.get(key)
        if s is None:
            return
        port = key[1]
        for _ in range(batch):
            try:
                data, anc, _flags, src = s.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO6.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error on the socket and the like
                self._debug(f"UDP {port}: {e}")
                continue
            dst = _destination(anc)
            if dst is None:
                continue
            # IPv6: (host, port, flowinfo, scope id); the core knows (host, port).
            yield data, (canonical(src[0].partition("%")[0]), src[1]), (dst, port)

    def send(self, datagrams: Iterable[Datagram]) -> list[str]:
        """Send each datagram from its source address and port; what failed, as text."""
        errors = []
        for d in datagrams:
            family = family_of(d.src[0])
            s = self.sockets.get((family, d.src[1]))
            if s is None:
                continue
            try:
                if family == socket.AF_INET6:
                    info = _PKTINFO6.pack(socket.inet_pton(socket.AF_INET6, d.src[0]), 0)
                    cmsg = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)
                else:
                    info = _PKTINFO.pack(0, socket.inet_aton(d.src[0]), b"\0\0\0\0")
                    cmsg = (socket.IPPROTO_IP, IP_PKTINFO, info)
                s.sendmsg([d.data], [cmsg], 0, d.dst)
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
        self.local_addr = canonical(local_addr)
        self.on_event = on_event
        self.on_esp = on_esp
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._adopt = sockets
        self._io = IkeSockets(lambda port, _family: bind_udp(local_addr, port))
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind (or adopt) the sockets and start serving."""
        self._loop = asyncio.get_running_loop()
        self._io.open(self._adopt, family_of(self.local_addr))
        for key, sock in self._io.sockets.items():
            self._loop.add_reader(sock.fileno(), self._readable, key)
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

    def _readable(self, key: SockKey) -> None:
        for data, src, dst in self._io.received(key):
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
