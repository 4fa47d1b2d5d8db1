"""A small asyncio driver for `IkeCore`: UDP ports 500 and 4500, timers, events.

The driver owns the sockets and the clock (`loop.time()`); everything else is the core's.
Datagrams on port 4500 that are ESP (not the non-ESP marker, not a keepalive) go to
`on_esp(payload, src)`, and `send_esp` sends UDP-encapsulated ESP from port 4500, so a
harness or the datapath can run the CHILD_SAs next to IKE on the same sockets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from espswitch.ike.consts import IKE_PORT, NAT_T_PORT
from espswitch.ike.core import IkeCore
from espswitch.ike.events import Event
from espswitch.packet.errors import PacketError
from espswitch.packet.esp import UdpEncapKind, split_udp_encap

__all__ = ["IkeDriver", "bind_udp"]

log = logging.getLogger("espswitch.ike")


def bind_udp(addr: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to (addr, port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.setblocking(False)
    return s


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, driver: IkeDriver, port: int) -> None:
        self.driver, self.port = driver, port

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.driver._datagram(data, addr, self.port)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error on port %d: %s", self.port, exc)


class IkeDriver:
    """Runs `core` on UDP 500/4500 of `local_addr` (or on the given bound sockets).

    Events go to `on_event` and to the `events` queue.
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
        self._sockets = sockets
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind (or adopt) the sockets and start serving."""
        self._loop = asyncio.get_running_loop()
        for port in (IKE_PORT, NAT_T_PORT):
            sock = (self._sockets or {}).get(port) or bind_udp(self.local_addr, port)
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda p=port: _Proto(self, p), sock=sock)
            self._transports[port] = transport
        self._flush()

    def close(self) -> None:
        """Stop serving and close the sockets."""
        if self._timer is not None:
            self._timer.cancel()
        for t in self._transports.values():
            t.close()
        self._transports.clear()

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
        self._transports[NAT_T_PORT].sendto(esp, dst)

    # -- plumbing ---------------------------------------------------------------------------

    def _datagram(self, data: bytes, src: tuple[str, int], port: int) -> None:
        if port == NAT_T_PORT:
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
        self.core.receive_datagram(data, src=src, dst=(self.local_addr, port), now=self.now)
        self._flush()

    def _flush(self) -> None:
        for d in self.core.datagrams_to_send():
            t = self._transports.get(d.src[1])
            if t is not None:
                t.sendto(d.data, d.dst)
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
