"""Benchmark: legitimate pings across a `vxlanipsec` tunnel while the underlay is flooded.

An attacker on the underlay (no key needed: the SPI is on the wire) sends hv2 forged ESP at
its tunnel's SPI, a mix of what issue 9 found costly: replays of captured packets, forgeries
with bad ICVs, ESP with IP options, ESP in UDP/4500, and 8-byte outer fragments. Meanwhile
VM1 pings VM2. Reported: ping loss and RTT without and with the flood, how many flood frames
espswitchd counted, and its RSS before and after. A benchmark, not a test: nothing asserts.

    sudo espswitch bench flood [--rate 20000] [--seconds 20] [--json FILE]

The sender is also a module entry point, used by the tests to flood from a namespace:

    python3 -m espswitch.benchmarks.flood send DEV FRAMES_FILE COUNT RATE
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import struct
import sys
import time
from collections.abc import Sequence

from espswitch.ipsec import OutboundSA, SaParams, parse_transform

_LEN = struct.Struct("!H")


# -- the frames ---------------------------------------------------------------------------------


def _csum(hdr: bytes) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ident: int = 0,
         frag: int = 0, options: bytes = b"") -> bytes:
    """An IPv4 packet (options padded to 4 bytes by the caller)."""
    ihl = 5 + len(options) // 4
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), ident,
                                frag, 64, proto, 0, src, dst) + options)
    hdr[10:12] = _csum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + payload


def forged_frames(*, dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, spi: int,
                  esp: str, key: bytes, replays_of: int, n: int = 512,
                  seed: int = 1) -> list[bytes]:
    """`n` hostile frames for the tunnel whose inbound SA is (`spi`, `esp`, `key`) at `dst`.

    Replays re-send authentic packets with sequence numbers 1..`replays_of` (which the
    victim has received: pass how many the peer sent), so they are dropped as replays or too
    old before any crypto; forgeries carry sequence numbers far ahead and random bytes, so
    only the ICV rejects them. No forged frame can be accepted.
    """
    rng = random.Random(seed)
    t = parse_transform(esp)
    sa = OutboundSA(SaParams(spi=spi, transform=t, keymat=key), seq_start=1)
    eth = dst_mac + src_mac + b"\x08\x00"
    inner = struct.pack("!HHHH", 49152, 4789, 8 + 8 + 60, 0) + struct.pack(
        "!II", 0x08000000, 1 << 8) + bytes(60)
    replays = [sa.encrypt(inner, 17) for _ in range(min(replays_of, 64))]
    frames = []
    for i in range(n):
        kind = i % 5
        if kind in (0, 1):  # a replay, as captured
            body = replays[i % len(replays)]
            frames.append(eth + ipv4(src, dst, 50, body, ident=i))
            continue
        seq = 3_000_000_000 + rng.randrange(1 << 20)
        body = struct.pack("!II", spi, seq) + rng.randbytes(8 + 76 + t.icv_len)
        if kind == 2:  # a forged ICV
            frames.append(eth + ipv4(src, dst, 50, body, ident=i))
        elif kind == 3:  # with IP options (a NOP-padded router alert), or in UDP/4500
            if i % 2:
                frames.append(eth + ipv4(src, dst, 50, body, ident=i,
                                         options=b"\x94\x04\x00\x00"))
            else:
                udp = struct.pack("!HHHH", 4500, 4500, 8 + len(body), 0) + body
                frames.append(eth + ipv4(src, dst, 17, udp, ident=i))
        else:  # an 8-byte outer fragment of an ESP datagram (more fragments follow)
            frames.append(eth + ipv4(src, dst, 50, body[:8], ident=rng.randrange(1 << 16),
                                     frag=0x2000 | rng.randrange(1, 100)))
    return frames


def write_frames(path: str, frames: Sequence[bytes]) -> None:
    with open(path, "wb") as f:
        for fr in frames:
            f.write(_LEN.pack(len(fr)) + fr)


def read_frames(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    out, i = [], 0
    while i + 2 <= len(data):
        (n,) = _LEN.unpack_from(data, i)
        out.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    return out


def send(dev: str, frames: Sequence[bytes], count: int, rate: float) -> float:
    """Send `count` frames (cycling through `frames`) out of `dev` at about `rate` per
    second (0: as fast as possible); returns the seconds it took."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((dev, 0))
    sendto = s.send
    k = len(frames)
    t0 = time.perf_counter()
    sent = 0
    chunk = 200
    try:
        while sent < count:
            n = min(chunk, count - sent)
            for j in range(sent, sent + n):
                try:
                    sendto(frames[j % k])
                except BlockingIOError:
                    time.sleep(0.0005)
                except OSError:
                    pass  # ENOBUFS under load: the frame is lost, as on a wire
            sent += n
            if rate:
                ahead = sent / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        s.close()
    return time.perf_counter() - t0


# -- the benchmark --------------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def _ping_stats(out: str) -> tuple[int, int, float | None]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    return int(m.group(1)), int(m.group(2)), float(rtt.group(1)) if rtt else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="espswitch bench flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20_000, help="flood frames per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="flood duration")
    parser.add_argument("--interval", type=float, default=0.01, help="ping interval (s)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("espswitch bench flood: needs root (network namespaces)", file=sys.stderr)
        return 2
    import secrets
    import subprocess
    import tempfile

    from espswitch.cli.lab import Lab

    esp = "aes128gcm16"
    n_key = parse_transform(esp).keymat_len
    k12, k21 = secrets.token_hex(n_key), secrets.token_hex(n_key)
    opts = ({"esp": esp, "spi_out": "0x1001", "spi_in": "0x2002", "esp_key_out": k12,
             "esp_key_in": k21},
            {"esp": esp, "spi_out": "0x2002", "spi_in": "0x1001", "esp_key_out": k21,
             "esp_key_in": k12})
    pings = int(args.seconds / args.interval)
    with Lab(tunnel_type="vxlanipsec", tunnel_options=opts) as lab, \
            tempfile.TemporaryDirectory() as tmp:
        hv1, hv2 = lab.hvs
        if not lab.wait_for_ping():
            print("the tunnel did not come up", file=sys.stderr)
            return 1
        lab.ping(100, 0.005)
        mac = lambda ns, dev: bytes.fromhex(  # noqa: E731
            subprocess.run(["ip", "-n", ns, "-br", "link", "show", dev], capture_output=True,
                           text=True, check=True).stdout.split()[2].replace(":", ""))
        frames = forged_frames(
            dst_mac=mac(hv2.ns, "br-phy"), src_mac=bytes.fromhex("02aabbccddee"),
            src=socket.inet_aton(hv1.underlay_ip), dst=socket.inet_aton(hv2.underlay_ip),
            spi=0x1001, esp=esp, key=bytes.fromhex(k12), replays_of=100)
        path = os.path.join(tmp, "frames.bin")
        write_frames(path, frames)
        pid = hv2.pid()
        results: dict[str, object] = {"rate": args.rate, "seconds": args.seconds}
        base = lab.ping(pings, args.interval)
        tx, rx, rtt = _ping_stats(base.stdout)
        results["quiet"] = {"sent": tx, "received": rx, "loss_pct": 100 * (tx - rx) / tx,
                            "rtt_avg_ms": rtt}
        rss0 = _rss_kb(pid)
        count = int(args.rate * args.seconds)
        flood = subprocess.Popen(
            ["ip", "netns", "exec", hv1.ns, sys.executable, "-m", "espswitch.benchmarks.flood",
             "send", hv1.underlay_dev, path, str(count), str(args.rate)],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        under = lab.ping(pings, args.interval)
        out, _ = flood.communicate(timeout=args.seconds * 4 + 60)
        tx, rx, rtt = _ping_stats(under.stdout)
        took = float(out.strip() or 0)
        results["flooded"] = {"sent": tx, "received": rx, "loss_pct": 100 * (tx - rx) / tx,
                              "rtt_avg_ms": rtt, "flood_frames": count,
                              "flood_seconds": took, "flood_rate": count / took if took else 0}
        results["rss_kb"] = {"before": rss0, "after": _rss_kb(pid)}
        results["drops"] = lab.appctl(hv2, "dpif/show").stdout.splitlines()[1:2]
        results["same_pid"] = hv2.pid() == pid
    q, f = results["quiet"], results["flooded"]
    print(f"ping {pings} x {args.interval * 1000:.0f} ms, quiet:   loss {q['loss_pct']:.2f}%  "
          f"rtt {q['rtt_avg_ms']} ms")
    print(f"ping {pings} x {args.interval * 1000:.0f} ms, flooded: loss {f['loss_pct']:.2f}%  "
          f"rtt {f['rtt_avg_ms']} ms  ({f['flood_frames']} forged frames at "
          f"{f['flood_rate']:.0f}/s)")
    print(f"espswitchd RSS {results['rss_kb']['before']} -> {results['rss_kb']['after']} kB, "
          f"same process: {results['same_pid']}")
    print(*results["drops"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def _send_main(argv: Sequence[str]) -> int:
    dev, path, count, rate = argv
    took = send(dev, read_frames(path), int(count), float(rate))
    print(f"{took:.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "send":
        sys.exit(_send_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
