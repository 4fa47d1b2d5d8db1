"""The espswitch side of the strongSwan tests: an IkeDriver in the test namespace, plus
a traffic harness that uses ChildSaInstalled events with the ESP engine."""

from __future__ import annotations

import asyncio
import contextlib

from espswitch.ike import ChildConfig, ChildSaInstalled, Credentials, IkeCore, PeerConfig
from espswitch.ike.driver import IkeDriver
from espswitch.ike.events import Event
from espswitch.ipsec import EspDrop, InboundSA, OutboundSA
from espswitch.packet.icmp import build_echo, parse_icmp
from espswitch.packet.ipv4 import build_ipv4_header, ip_to_bytes

from .strongswan import ES_ADDR, ES_INNER, ES_NET, PSK, SW_ADDR, SW_INNER, SW_NET, Lab, udp_sockets


def es_peer(**kw: object) -> PeerConfig:
    """espswitch's view of charon: PSK, tunnel 10.200.1.0/24 <-> 10.200.2.0/24, NAT-T."""
    kw.setdefault("credentials", Credentials(psk=PSK.encode()))
    kw.setdefault("local_id", "espswitch.test")
    kw.setdefault("remote_id", "charon.test")
    kw.setdefault("children", (ChildConfig(name="net", local_ts=ES_NET, remote_ts=SW_NET),))
    kw.setdefault("encap", True)
    return PeerConfig(name="sw", local_addr=ES_ADDR, remote_addr=SW_ADDR, **kw)


class EsSide:
    """An IKE driver on 192.0.2.1 and the ESP SAs its events install."""

    def __init__(self, lab: Lab, peer: PeerConfig) -> None:
        self.core = IkeCore([peer])
        self.driver = IkeDriver(self.core, ES_ADDR, sockets=udp_sockets(lab.es_ns, ES_ADDR),
                                on_event=self._event, on_esp=self._esp)
        self.seen: list[Event] = []
        self.inbound: dict[int, InboundSA] = {}
        self.outbound: OutboundSA | None = None
        self.out_ev: ChildSaInstalled | None = None
        self.replies: list[int] = []
        self.esp_in_by_spi: dict[int, int] = {}
        self._changed = asyncio.Event()

    async def __aenter__(self) -> EsSide:
        await self.driver.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.driver.close()

    def _event(self, ev: Event) -> None:
        self.seen.append(ev)
        if isinstance(ev, ChildSaInstalled):
            self.inbound[ev.spi_in] = InboundSA(ev.inbound_params())
            self.outbound = OutboundSA(ev.outbound_params())
            self.out_ev = ev
        self._changed.set()

    def _esp(self, data: bytes, src: tuple[str, int]) -> None:
        spi = int.from_bytes(data[:4], "big")
        sa = self.inbound.get(spi)
        if sa is None:
            return
        try:
            nh, inner = sa.decrypt(data)
        except EspDrop:
            return
        if nh == 4 and inner[9] == 1:
            icmp = parse_icmp(inner[20:])
            if icmp.type == 0:
                self.replies.append(icmp.seq)
                self.esp_in_by_spi[spi] = self.esp_in_by_spi.get(spi, 0) + 1
                self._changed.set()

    async def wait(self, pred, timeout: float = 10.0) -> None:
        """Wait until `pred()` holds."""
        async def go() -> None:
            while not pred():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.2)
        await asyncio.wait_for(go(), timeout)

    def of(self, cls: type) -> list:
        """The events of one class seen so far."""
        return [e for e in self.seen if isinstance(e, cls)]

    def ping(self, seq: int) -> None:
        """Send one ICMP echo request 10.200.1.1 -> 10.200.2.1 through the newest CHILD_SA."""
        icmp = build_echo(8, 0x4242, seq, b"espswitch-ike" * 4)
        pkt = build_ipv4_header(src=ip_to_bytes(ES_INNER), dst=ip_to_bytes(SW_INNER), proto=1,
                                payload_len=len(icmp), ident=seq) + icmp
        esp = self.outbound.encrypt(pkt, 4)
        self.driver.send_esp(esp, self.out_ev.remote_addr)

    async def ping_ok(self, seq: int, timeout: float = 5.0) -> bool:
        """Ping until a reply with `seq` comes back (libipsec may take a moment)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            self.ping(seq)
            try:
                await self.wait(lambda: seq in self.replies, 0.5)
                return True
            except TimeoutError:
                continue
        return False


async def run_cmd(argv: list[str], timeout: float = 20) -> str:
    """Run a command without blocking the event loop (the driver must keep answering)."""
    p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(p.communicate(), timeout)
    return out.decode(errors="replace")


__all__ = ["EsSide", "es_peer", "run_cmd"]
