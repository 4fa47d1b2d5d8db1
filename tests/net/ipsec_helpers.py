"""Helpers for the `vxlanipsec` end-to-end tests: keys, counters, captures, iperf3, tshark.

They drive `espswitch.cli.lab.Lab` (the two-hypervisor topology of the demo) with the tools an
operator has: `ovs-vsctl`, `ovs-appctl`, `ip`, `tcpdump`, `iperf3`, `tshark`, scapy.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from espswitch.cli.lab import Lab, LabError, run, start_charon, stop_charon
from espswitch.ipsec import parse_transform

SPI_1TO2, SPI_2TO1 = 0x1001, 0x2001  # hv1 -> hv2 and hv2 -> hv1
UNDERLAY_IPS = {"192.0.2.1", "192.0.2.2"}  # the lab's two tunnel endpoints
STATS_TIMEOUT = 12.0  # Interface.statistics is written every 5 s
# 16 bytes that ping repeats in its payload (`ping -p`): must never show on the underlay.
PATTERN = bytes.fromhex("e5b0c0ffee5ec7e7da7a0badcafe4242")

# tshark's esp_sa names for the two transforms tshark 4.0 can decrypt.
TSHARK_ALGS = {
    "aes128gcm16": ("AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    "aes128-sha256": ("AES-CBC [RFC3602]", "HMAC-SHA-256-128 [RFC4868]"),
}


@dataclass
class Keys:
    """The manual keying of one tunnel: hv1's outbound SA is hv2's inbound SA and back."""

    esp: str
    spi_1to2: int
    spi_2to1: int
    key_1to2: str  # hex keying material, RFC 7296 order
    key_2to1: str
    #: the lab's tunnel endpoints, hv1's and hv2's (Lab.underlay_ips)
    underlay: tuple[str, str] = ("192.0.2.1", "192.0.2.2")

    @classmethod
    def fresh(cls, esp: str, spi_1to2: int = SPI_1TO2, spi_2to1: int = SPI_2TO1) -> Keys:
        n = parse_transform(esp).keymat_len
        return cls(esp, spi_1to2, spi_2to1, secrets.token_hex(n), secrets.token_hex(n))

    def options(self, **extra: str) -> tuple[dict[str, str], dict[str, str]]:
        """`options:` of tun0 on hv1 and on hv2."""
        hv1 = {"esp": self.esp, "spi_out": hex(self.spi_1to2), "spi_in": hex(self.spi_2to1),
               "esp_key_out": self.key_1to2, "esp_key_in": self.key_2to1, **extra}
        hv2 = {"esp": self.esp, "spi_out": hex(self.spi_2to1), "spi_in": hex(self.spi_1to2),
               "esp_key_out": self.key_2to1, "esp_key_in": self.key_1to2, **extra}
        return hv1, hv2

    def sas(self) -> list[tuple[str, str, int, str]]:
        """(source, destination, SPI, key hex) of both directions on the underlay."""
        one, two = self.underlay
        return [(one, two, self.spi_1to2, self.key_1to2),
                (two, one, self.spi_2to1, self.key_2to1)]


def keyed_lab(keys: Keys, **extra: str) -> Lab:
    """A `vxlanipsec` lab keyed with `keys` (use as a context manager)."""
    return Lab(tunnel_type="vxlanipsec", tunnel_options=keys.options(**extra))


def rekey(lab: Lab, keys: Keys, **extra: str) -> None:
    """Set new keying on both sides of a running lab (ovs-vsctl waits until it is live)."""
    lab.tunnel_options = keys.options(**extra)
    a, b = lab.hvs
    for hv, peer in ((a, b), (b, a)):
        lab.vsctl(hv, "set", "interface", hv.tunnel, *lab.tunnel_args(hv, peer))


# -- state an operator reads ---------------------------------------------------------------


def statistics(lab: Lab, hv_index: int, iface: str = "tun0") -> dict[str, int]:
    out = lab.vsctl(lab.hvs[hv_index], "get", "interface", iface, "statistics").stdout
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out)}


def status(lab: Lab, hv_index: int, iface: str = "tun0") -> dict[str, str]:
    out = lab.vsctl(lab.hvs[hv_index], "get", "interface", iface, "status").stdout
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,}\s]+)', out)}


def wait_for(pred: Callable[[], object], timeout: float, interval: float = 0.25) -> object:
    """pred()'s first truthy value within `timeout` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def established(lab: Lab, timeout: float = 15.0) -> tuple[dict, dict]:
    """Wait until both sides report ipsec_state=established; return both statuses."""
    def both():
        st = (status(lab, 0), status(lab, 1))
        return st if all(s.get("ipsec_state") == "established" for s in st) else None
    st = wait_for(both, timeout)
    assert st, f"not established: {status(lab, 0)} / {status(lab, 1)}"
    return st


def wait_for_counter(lab: Lab, hv_index: int, name: str, at_least: int,
                     timeout: float = STATS_TIMEOUT) -> int:
    """Poll Interface.statistics until counter `name` reaches `at_least`; its last value."""
    last = {name: -1}

    def reached() -> bool:
        last[name] = statistics(lab, hv_index).get(name, -1)
        return last[name] >= at_least

    wait_for(reached, timeout, 0.5)
    return last[name]


def ipsec_show(lab: Lab, hv_index: int, *args: str) -> str:
    return lab.appctl(lab.hvs[hv_index], "ipsec/show", *args).stdout


def sa_rows(lab: Lab, hv_index: int) -> dict[str, dict]:
    """ipsec/show --json of tun0, keyed by direction ("in", "out")."""
    rows = json.loads(ipsec_show(lab, hv_index, "--json", "tun0"))["sas"]
    return {r["direction"]: r for r in rows}


def received(ping: subprocess.CompletedProcess[str]) -> int:
    m = re.search(r"(\d+) received", ping.stdout)
    assert m, f"no ping summary:\n{ping.stdout}\n{ping.stderr}"
    return int(m.group(1))


class BackgroundPing:
    """VM 0 pings VM 1 in the background while the test changes things; use as a context
    manager (the ping is killed if the block fails) and take `result()` at the end."""

    def __init__(self, lab: Lab, count: int, interval: float = 0.02,
                 size: int | None = None) -> None:
        self.cmd = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2"]
        if size is not None:
            self.cmd += ["-s", str(size)]
        self.cmd.append(lab.hvs[1].vm_ip)
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.hvs[0].vm_ns, *self.cmd],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        stdout, _ = self.proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, stdout, "")

    def __enter__(self) -> BackgroundPing:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def espswitchd_pid(lab: Lab, hv_index: int) -> int:
    with open(os.path.join(lab.hvs[hv_index].dir, "espswitchd.pid")) as f:
        return int(f.read())


def mac_of(ns: str, dev: str) -> str:
    return json.loads(run(["ip", "-j", "link", "show", dev], ns=ns).stdout)[0]["address"]


def pin_neighbours(lab: Lab) -> None:
    """Permanent ARP entries in both VMs, so that pings go out even when the tunnel is down."""
    a, b = lab.hvs
    for hv, peer in ((a, b), (b, a)):
        run(["ip", "neigh", "replace", peer.vm_ip, "lladdr", mac_of(peer.vm_ns, peer.tap),
             "dev", hv.tap, "nud", "permanent"], ns=hv.vm_ns)


# -- traffic and captures ------------------------------------------------------------------


def iperf3(lab: Lab, src: int = 0, args: Sequence[str] = ("-t", "5"),
           timeout: float = 60) -> dict:
    """iperf3 TCP from VM `src` to the other VM; the client's JSON result."""
    client, server = lab.hvs[src], lab.hvs[1 - src]
    srv = subprocess.Popen(["ip", "netns", "exec", server.vm_ns, "iperf3", "-s", "-1",
                            "-B", server.vm_ip],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        listening = wait_for(lambda: ":5201" in run(["ss", "-Hltn"], ns=server.vm_ns).stdout,
                             10, 0.05)
        assert listening, "iperf3 server did not start listening"
        try:
            r = run(["iperf3", "-c", server.vm_ip, "-J", *args], ns=client.vm_ns,
                    check=False, timeout=timeout)
        except Exception as e:  # LabError on timeout: a stalled transfer
            raise AssertionError(f"iperf3 client: {e}") from None
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"iperf3 printed no JSON: {r.stdout} {r.stderr}") from None
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


_SINK = """
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
srv.settimeout(30)
conn, _ = srv.accept()
conn.settimeout(30)
h, n = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""

_SOURCE = """
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[3]))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def tcp_transfer(lab: Lab, nbytes: int, src: int = 0, port: int = 5300,
                 timeout: float = 60) -> tuple[str, str]:
    """Send `nbytes` random bytes over TCP from VM `src` to the other VM.

    Returns (what the sender sent, what the receiver got), each as "length sha256"."""
    client, server = lab.hvs[src], lab.hvs[1 - src]
    sink = subprocess.Popen(["ip", "netns", "exec", server.vm_ns, "python3", "-c", _SINK,
                             server.vm_ip, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "listening", sink.stderr
        try:
            sent = run(["python3", "-c", _SOURCE, server.vm_ip, str(port), str(nbytes)],
                       ns=client.vm_ns, timeout=timeout).stdout.strip()
        except Exception as e:  # LabError: timed out or failed (a stalled transfer)
            raise AssertionError(f"TCP transfer of {nbytes} bytes: {e}") from None
        got, _ = sink.communicate(timeout=10)
        return sent, got.strip()
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def scapy():
    """scapy, or a skipped test where it is missing."""
    return pytest.importorskip("scapy.all")


def underlay_ipv4(pcap: str) -> list:
    """The IPv4 packets between the two underlay addresses (no ARP, no IPv6 noise)."""
    s = scapy()
    return [p for p in s.rdpcap(pcap)
            if p.haslayer(s.IP) and {p[s.IP].src, p[s.IP].dst} == UNDERLAY_IPS]


def send_frames(ns: str, dev: str, pcap: str) -> int:
    """Send every frame of `pcap` out of `dev` in namespace `ns` (scapy sendp); how many."""
    code = ("import sys\nfrom scapy.all import rdpcap, sendp\n"
            "p = rdpcap(sys.argv[1])\nsendp(p, iface=sys.argv[2], verbose=False)\n"
            "print(len(p))\n")
    return int(run(["python3", "-c", code, pcap, dev], ns=ns, timeout=60).stdout)


def tshark_available() -> bool:
    return shutil.which("tshark") is not None


def tshark_rows(pcap: str, keys: Keys, fields: Sequence[str],
                display_filter: str = "esp") -> list[dict[str, str]]:
    """tshark's fields for each packet of `pcap`, decrypting both SAs of `keys`."""
    enc_alg, auth_alg = TSHARK_ALGS[keys.esp]
    t = parse_transform(keys.esp)
    cmd = ["tshark", "-n", "-r", pcap, "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE"]
    for src, dst, spi, key in keys.sas():
        km = bytes.fromhex(key)
        enc_len = t.enc_key_len + t.salt_len
        enc, integ = km[:enc_len], km[enc_len:]
        family = "IPv6" if ":" in src else "IPv4"
        fields_sa = [family, src, dst, f"0x{spi:08x}", enc_alg, "0x" + enc.hex(), auth_alg,
                     "0x" + integ.hex() if integ else ""]
        cmd += ["-o", "uat:esp_sa:" + ",".join(f'"{f}"' for f in fields_sa)]
    cmd += ["-Y", display_filter, "-T", "fields", "-E", "occurrence=l"]
    for f in fields:
        cmd += ["-e", f]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [dict(zip(fields, line.split("\t"), strict=True))
            for line in r.stdout.splitlines()]


# -- strongSwan as a peer -------------------------------------------------------------------


class Charon:
    """charon with kernel-libipsec in namespace `ns`; its run, log and swanctl directory is
    `d` (put credentials under d/x509, d/x509ca, d/rsa, d/ecdsa before `start`)."""

    def __init__(self, ns: str, d: Path) -> None:
        self.ns, self.dir = ns, d
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"unix://{self.dir}/charon.vici"

    def start(self, swanctl_conf: str) -> None:
        """Start charon and load `swanctl_conf` and whatever credentials are in `d`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "swanctl.conf").write_text(swanctl_conf)
        try:
            self.proc = start_charon(self.ns, str(self.dir))
        except LabError as e:
            raise AssertionError(str(e)) from None
        self.swanctl("--load-all")

    def swanctl(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        env = {"STRONGSWAN_CONF": str(self.dir / "strongswan.conf"),
               "SWANCTL_DIR": str(self.dir)}
        r = run(["swanctl", *args, "--uri", self.uri], self.ns, env=env, check=False,
                timeout=timeout)
        if check and r.returncode:
            raise AssertionError(f"swanctl {' '.join(args)} -> {r.returncode}\n{r.stdout}\n"
                                 f"{r.stderr}\ncharon.log:\n{self.log()[-3000:]}")
        return r.stdout + r.stderr

    def list_sas(self) -> str:
        return self.swanctl("--list-sas", check=False)

    def log(self) -> str:
        p = self.dir / "charon.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        stop_charon(self.proc)


def iface_status(hv, iface: str = "tun0") -> dict[str, str]:
    """Interface.status of `iface` on a labkit hypervisor `hv`."""
    out = hv.iface(iface, "status")
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,}\s]+)', out)}
