"""Benchmark of the receive direction NIC -> VM: frames/s through `Datapath.receive`.

An in-memory hypervisor (br-phy: eth0 + internal 10.0.0.2; br-int: a TAP "vm" and a
`vxlanipsec` tunnel to 10.0.0.1 with a compiled inbound SA, aes128gcm16) receives
authentic ESP frames on eth0, in batches of 32, each carrying a VXLAN frame of
`--size` bytes (default 1400) for the VM. Measured with `Datapath.fast_path` on (the
compiled `rx_burst`), off (the Python path with the compiled SA) and python (the
Python path with the Python SA: the datapath before issue 10), in
alternation for a few rounds, best of each kept. The frames are sealed before the clock
starts; each round gets a fresh hypervisor, so that its replay window accepts them all.
One process, one thread; nothing asserts timings.

Run:  PYTHONPATH=src python3 bench/rx_pipeline.py [--size 1400] [--frames 9600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import struct
import time

from espswitch.datapath import Datapath, fast
from espswitch.datapath.devices import MemoryDevices
from espswitch.datapath.tunnel import Route, ip4
from espswitch.ipsec import OutboundSA, SaParams, parse_transform

LOCAL, REMOTE = "10.0.0.2", "10.0.0.1"
SPI_IN, SPI_OUT = 0x2001, 0x1001
KEY = bytes(range(20))
VM_MAC, PEER_MAC, ROUTER = (bytes([0x52, 0x54, 0, 0, 0, n]) for n in (2, 1, 50))
BATCH = 32


def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                    ip4(src), ip4(dst))
    s = sum(struct.unpack("!10H", h))
    s = (s & 0xFFFF) + (s >> 16)
    return h[:10] + struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF) + h[12:] + payload


def hypervisor(fast_path: bool, compiled: bool = True) -> tuple[Datapath, MemoryDevices]:
    devs = MemoryDevices(system_names=("eth0",), mac_prefix=2)
    dp = Datapath(devs)
    dp.add_bridge("br-phy")
    dp.add_port("br-phy", "br-phy", "internal")
    dp.add_port("br-phy", "eth0", "system")
    dp.routes.set_system([Route(prefix=int.from_bytes(ip4("10.0.0.0"), "big"), plen=24,
                                dev="br-phy", src=ip4(LOCAL))], {"br-phy": [ip4(LOCAL)]})
    dp.add_bridge("br-int")
    dp.add_port("br-int", "br-int", "internal")
    dp.add_port("br-int", "vm", "tap")
    tun = dp.add_port("br-int", "vx0", "vxlanipsec", {
        "remote_ip": REMOTE, "key": "100", "esp": "aes128gcm16", "spi_in": hex(SPI_IN),
        "spi_out": hex(SPI_OUT), "esp_key_in": KEY.hex(), "esp_key_out": KEY.hex()})
    esp = tun.esp
    # Until the SA factory is wired into protection.py: install the compiled inbound SA.
    if compiled:
        esp._layer.remove(esp.sa_in)
        esp.sa_in = fast.make_inbound_sa(esp.sa_in.params)
        esp._layer.add(esp, esp.sa_in)
    # The VM's MAC is learned from one frame of its own.
    dp.receive(dp.ports["vm"], [b"\xff" * 6 + VM_MAC + b"\x08\x06" + bytes(46)])
    dp.fast_path = fast_path and fast.AVAILABLE
    for d in devs.devices.values():
        d.take()
    return dp, devs


def frames(n: int, size: int) -> list[bytes]:
    """`n` authentic ESP frames from the peer, each with a `size`-byte inner frame."""
    sa = OutboundSA(SaParams(spi=SPI_IN, transform=parse_transform("aes128gcm16"), keymat=KEY))
    dst_mac = MemoryDevices(mac_prefix=2).open_tap("br-phy").mac
    head = dst_mac + ROUTER + b"\x08\x00"
    body = VM_MAC + PEER_MAC + b"\x08\x00" + bytes(size - 14)
    out = []
    for _ in range(n):
        vx = struct.pack("!HHHHII", 49152, 4789, 16 + len(body), 0, 0x08000000, 100 << 8)
        out.append(head + _ipv4(REMOTE, LOCAL, 50, sa.encrypt(vx + body, 17)))
    return out


def one_round(pool: list[bytes], mode: str) -> tuple[float, dict[str, int]]:
    dp, devs = hypervisor(mode == "on", compiled=mode != "python")
    eth0, vm = dp.ports["eth0"], devs.devices["vm"]
    dp.receive(eth0, pool[:2])  # the first packets teach the bridges both MACs
    vm.take()
    timed = pool[2:]
    batches = [timed[i:i + BATCH] for i in range(0, len(timed), BATCH)]
    start = time.perf_counter()
    for b in batches:
        dp.receive(eth0, b)
    elapsed = time.perf_counter() - start
    delivered = len(vm.take())
    f = dp._fast
    counts = {"delivered": delivered, "hits": f.hits if f else 0,
              "misses": f.misses if f else 0}
    assert delivered == len(timed), (delivered, len(timed))
    return len(timed) / elapsed, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--frames", type=int, default=BATCH * 300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    pool = frames(args.frames + 2, args.size)
    # python: fast path off, Python inbound SA (the datapath before issue 10);
    # off: fast path off, compiled SA (what protection.py gets from the SA factory);
    # on: the compiled receive pipeline.
    modes = ("python", "off", "on") if fast.AVAILABLE else ("python",)
    best = dict.fromkeys(("python", "off", "on"), 0.0)
    counts = {}
    for _ in range(args.rounds):
        for mode in modes:
            rate, c = one_round(pool, mode)
            if rate > best[mode]:
                best[mode], counts[mode] = rate, c
    print(f"receive NIC -> VM, aes128gcm16, {args.size}-byte inner frames, batches of {BATCH}")
    for mode in ("python", "off", "on"):
        if best[mode]:
            print(f"  {mode:6}: {best[mode]:10.0f} frames/s "
                  f"({best[mode] * args.size * 8 / 1e9:.2f} Gbit/s inner)  {counts[mode]}")
    if best["on"] and best["off"]:
        print(f"  on / off: {best['on'] / best['off']:.2f}x, "
              f"on / python: {best['on'] / best['python']:.2f}x")
    if not fast.AVAILABLE:
        print(f"  ({fast.REASON})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "frames_per_s": best, "counts": counts}, f)


if __name__ == "__main__":
    main()
