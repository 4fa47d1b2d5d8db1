"""Frame builders for datapath tests (bytes only, no devices)."""

from __future__ import annotations

import struct

from espswitch.datapath import Datapath
from espswitch.datapath.devices import MemoryDevices
from espswitch.datapath.tunnel import Route, ip4, ip_addr
from espswitch.packet.udp import udp_checksum_ipv6

BCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x52, 0x54, 0, 0, 0, n])


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 46, et: int = 0x0800) -> bytes:
    return dst + src + struct.pack("!H", et) + payload


def tagged(dst: bytes, src: bytes, vid: int, payload: bytes = b"x" * 46) -> bytes:
    return dst + src + struct.pack("!HHH", 0x8100, vid, 0x0800) + payload


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    h = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0, ip4(src), ip4(dst)
    )
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def vxlan(vni: int, inner: bytes) -> bytes:
    return struct.pack("!II", 0x08000000, vni << 8) + inner


def ipv6(src: str, dst: str, nh: int, payload: bytes, hlim: int = 64) -> bytes:
    """An IPv6 packet; a UDP payload gets its checksum (mandatory over IPv6)."""
    s6, d6 = ip_addr(src), ip_addr(dst)
    if nh == 17 and payload[6:8] == b"\0\0":
        payload = payload[:6] + struct.pack("!H", udp_checksum_ipv6(s6, d6, payload)) + \
            payload[8:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, hlim, s6, d6) + payload


def arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    return struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sha + ip4(spa) + tha + ip4(tpa)


class Hypervisor:
    """An in-memory hypervisor: br-phy (eth0 + internal, address `ip`), br-int (vm, vxlan).

    `ip` IPv4 (in 10.0.0.0/24) or IPv6 (in fd00::/64, the underlay's prefix then)."""

    def __init__(self, ip: str, remote: str, vni: int | None = 100, vm_tag: int | None = None,
                 tun_type: str = "vxlan", tun_options: dict[str, str] | None = None,
                 wire: bool = False) -> None:
        raw = ip_addr(ip)
        self.v6 = len(raw) == 16
        self.devs = MemoryDevices(system_names=("eth0",), mac_prefix=raw[-1], wire=wire)
        self.dp = Datapath(self.devs)
        dp = self.dp
        dp.add_bridge("br-phy")
        dp.add_port("br-phy", "br-phy", "internal")
        dp.add_port("br-phy", "eth0", "system")
        net = ip_addr("fd00::") if self.v6 else ip4("10.0.0.0")
        dp.routes.set_system(
            [
                Route(
                    prefix=int.from_bytes(net, "big"),
                    plen=64 if self.v6 else 24,
                    dev="br-phy",
                    src=raw,
                    v6=self.v6,
                )
            ],
            {"br-phy": [raw]},
        )
        dp.add_bridge("br-int")
        dp.add_port("br-int", "br-int", "internal")
        dp.add_port("br-int", "vm", "tap", tag=vm_tag)
        key = {"key": str(vni)} if vni is not None else {}
        self.tun = dp.add_port("br-int", "vx0", tun_type,
                               {"remote_ip": remote, **key, **(tun_options or {})})
        self.ip = ip

    def dev(self, name: str):
        return self.devs.devices[name]

    def inject(self, name: str, *frames: bytes) -> None:
        self.dp.receive(self.dp.ports[name], list(frames))
