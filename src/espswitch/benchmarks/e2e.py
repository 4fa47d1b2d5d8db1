"""End-to-end benchmark: VM-to-VM TCP throughput and ping RTT over four VXLAN paths.

In one run, for each path, it builds the topology, measures, and tears everything down:

- espswitch-vxlanipsec-aes128gcm16: the two-hypervisor lab (`espswitch.cli.lab.Lab`) with a
  `vxlanipsec` tunnel, `esp=aes128gcm16`, manual keys drawn at random for this run;
- espswitch-vxlan: the same lab with a plain `vxlan` tunnel;
- kernel-vxlan: two namespaces on a veth (192.0.2.1/.2) with kernel VXLAN devices (VNI 42,
  inner 198.51.100.1/.2), no encryption: the ceiling of the machine;
- strongswan-libipsec: the same kernel VXLAN carried by strongSwan's userspace ESP
  (charon with kernel-libipsec, tunnel mode, UDP/4500, aes128gcm16, IKEv2 with a PSK), as in
  `../shared/spec/references.md`: the C baseline espswitch's `vxlanipsec` is compared with.

Throughput: `iperf3 -c PEER -t N -J` (server `iperf3 -s -1` in the peer namespace), the
`sum_received` bits per second. RTT: `ping -c 1000 -i 0.002`, the average. It prints a table with
each path's ratio to strongswan-libipsec, writes JSON (`--json`) and a two-panel bar chart
(`--png`, default bench/e2e.png). Nothing asserts timings: this is a benchmark, not a test.
The machine has 2 cores and may be busy: compare paths within one run, and run it more than
once (each result records the load average when its path started).

Run (root):  python3 bench/e2e.py [--quick] [--paths P,P] [--json FILE] [--png FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from espswitch.cli.lab import CHARON, Lab, LabError, run, start_charon, stop_charon
from espswitch.cli.labkit import add_netns, delete_netns

PATHS = ("espswitch-vxlanipsec-aes128gcm16", "espswitch-vxlan", "kernel-vxlan",
         "strongswan-libipsec")
BASELINE = "strongswan-libipsec"
UNDERLAY = ("192.0.2.1", "192.0.2.2")
INNER = ("198.51.100.1", "198.51.100.2")
KERNEL_VNI = 42
PING_COUNT = 1000  # the latency run of issue 3: 1000 pings
PING_INTERVAL = "0.002"



class BenchError(Exception):
    """A path could not be built or measured; the message says which step and why."""


# -- measuring -----------------------------------------------------------------------------

def _wait_listening(ns: str, port: int = 5201, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run(["ss", "-Htln", f"sport = :{port}"], ns=ns, check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"iperf3 server in {ns} not listening after {timeout:.0f} s")


def iperf_tcp(server_ns: str, client_ns: str, server_ip: str, seconds: int) -> float:
    """iperf3 TCP from client_ns to server_ip (served in server_ns); received Gbit/s."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(server_ns)
        r = run(["iperf3", "-c", server_ip, "-t", str(seconds), "-J"], ns=client_ns,
                check=False, timeout=seconds + 60)
        try:
            data = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"iperf3 -c gave no JSON (rc {r.returncode}): "
                             f"{(r.stderr or r.stdout).strip()[-300:]}") from None
        if "error" in data:
            raise BenchError(f"iperf3: {data['error']}")
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=5)
        if server.poll() is None:
            server.kill()
            server.wait()


def ping_avg(ns: str, dst: str) -> float:
    """Average RTT in ms of `ping -c 1000 -i 0.002` from ns to dst."""
    r = run(["ping", "-n", "-q", "-c", str(PING_COUNT), "-i", PING_INTERVAL, "-W", "2", dst],
            ns=ns, check=False, timeout=60)
    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    if not m:
        raise BenchError(f"ping {dst}: no RTT summary (rc {r.returncode}): "
                         f"{(r.stdout + r.stderr).strip().splitlines()[-1:]}")
    return float(m.group(1))


def wait_ping(ns: str, dst: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run(["ping", "-n", "-q", "-c", "1", "-W", "1", dst], ns=ns,
               check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise BenchError(f"no ping reply from {dst} within {timeout:.0f} s")


def measure(src_ns: str, dst_ns: str, dst_ip: str, seconds: int) -> dict[str, Any]:
    """Reachability, then RTT (before the bulk transfer), then TCP throughput."""
    wait_ping(src_ns, dst_ip)
    rtt_ms_avg = ping_avg(src_ns, dst_ip)
    gbps = iperf_tcp(dst_ns, src_ns, dst_ip, seconds)
    return {"tcp_gbps": gbps, "rtt_ms_avg": rtt_ms_avg}


# -- namespaces ----------------------------------------------------------------------------

@contextlib.contextmanager
def veth_pair_namespaces(tag: str) -> Iterator[tuple[str, str]]:
    """Two fresh namespaces joined by a veth (eth0 in each) with 192.0.2.1/.2; deleted after."""
    suffix = secrets.token_hex(3)
    names = (f"eb{tag}a-{suffix}", f"eb{tag}b-{suffix}")
    made: list[str] = []
    try:
        for ns in names:
            add_netns(ns, ipv6=True)
            made.append(ns)
        run(["ip", "link", "add", "eth0", "netns", names[0], "type", "veth",
             "peer", "name", "eth0", "netns", names[1]])
        for ns, ip in zip(names, UNDERLAY, strict=True):
            run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], ns=ns)
            run(["ip", "link", "set", "eth0", "up"], ns=ns)
        yield names
    finally:
        for ns in reversed(made):
            delete_netns(ns)


def _mtu(ns: str, dev: str) -> int:
    return int(run(["cat", f"/sys/class/net/{dev}/mtu"], ns=ns).stdout)


def add_kernel_vxlan(ns: str, local: str, remote: str, inner: str,
                     mtu: int | None = None) -> None:
    run(["ip", "link", "add", "vx0", "type", "vxlan", "id", str(KERNEL_VNI), "local", local,
         "remote", remote, "dstport", "4789"], ns=ns)
    if mtu is not None:
        run(["ip", "link", "set", "vx0", "mtu", str(mtu)], ns=ns)
    run(["ip", "addr", "add", f"{inner}/24", "dev", "vx0"], ns=ns)
    run(["ip", "link", "set", "vx0", "up"], ns=ns)


# -- the paths -----------------------------------------------------------------------------

def _random_keys(esp: str, key_len: int) -> tuple[dict[str, str], dict[str, str]]:
    k12, k21 = secrets.token_hex(key_len), secrets.token_hex(key_len)
    spi12, spi21 = (int.from_bytes(os.urandom(4), "big") | 0x1000 for _ in range(2))
    one = {"esp": esp, "spi_out": hex(spi12), "spi_in": hex(spi21),
           "esp_key_out": k12, "esp_key_in": k21}
    two = {"esp": esp, "spi_out": hex(spi21), "spi_in": hex(spi12),
           "esp_key_out": k21, "esp_key_in": k12}
    return one, two


def _espswitch(tunnel_type: str, opts: tuple[dict[str, str], dict[str, str]],
               seconds: int) -> dict[str, Any]:
    with Lab(tunnel_type=tunnel_type, tunnel_options=opts) as lab:
        a, b = lab.hvs
        result = measure(a.vm_ns, b.vm_ns, b.vm_ip, seconds)
        result["vm_mtu"] = _mtu(a.vm_ns, a.tap)
        if tunnel_type == "vxlanipsec":
            # The tunnel really ran ESP with this transform, and its SAs did not expire.
            status = {k: lab.vsctl(a, "get", "interface", a.tunnel, f"status:{k}",
                                   check=False).stdout.strip().strip('"')
                      for k in ("ipsec_state", "esp")}
            result.update(status)
            if status["ipsec_state"] != "manual" or status["esp"] != "aes128gcm16":
                raise BenchError(f"tunnel status after the transfer: {status}")
        return result


def bench_espswitch_vxlanipsec(seconds: int) -> dict[str, Any]:
    return _espswitch("vxlanipsec", _random_keys("aes128gcm16", 20), seconds)


def bench_espswitch_vxlan(seconds: int) -> dict[str, Any]:
    return _espswitch("vxlan", ({}, {}), seconds)


def bench_kernel_vxlan(seconds: int) -> dict[str, Any]:
    with veth_pair_namespaces("kv") as (a, b):
        add_kernel_vxlan(a, UNDERLAY[0], UNDERLAY[1], INNER[0])
        add_kernel_vxlan(b, UNDERLAY[1], UNDERLAY[0], INNER[1])
        return {**measure(a, b, INNER[1], seconds), "vm_mtu": _mtu(a, "vx0")}




def _swanctl_conf(local: str, remote: str, local_id: str, remote_id: str, psk: str) -> str:
    return f"""connections {{
  vx {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = aes128gcm16-prfsha256-x25519
    local {{
      auth = psk
      id = {local_id}
    }}
    remote {{
      auth = psk
      id = {remote_id}
    }}
    children {{
      vx-out {{
        local_ts = {local}/32[udp]
        remote_ts = {remote}/32[udp/4789]
        esp_proposals = aes128gcm16
        mode = tunnel
      }}
      vx-in {{
        local_ts = {local}/32[udp/4789]
        remote_ts = {remote}/32[udp]
        esp_proposals = aes128gcm16
        mode = tunnel
      }}
    }}
  }}
}}
secrets {{
  ike-ab {{
    id-a = a
    id-b = b
    secret = "{psk}"
  }}
}}
"""


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def bench_strongswan_libipsec(seconds: int) -> dict[str, Any]:
    if not os.access(CHARON, os.X_OK) or shutil.which("swanctl") is None:
        raise BenchError(f"strongSwan not installed ({CHARON}, swanctl)")
    tmp = tempfile.mkdtemp(prefix="eb-swan-")
    charons: list[subprocess.Popen[bytes]] = []
    try:
        with veth_pair_namespaces("sw") as names:
            dirs = []
            psk = secrets.token_hex(16)
            for i, ns in enumerate(names):
                d = os.path.join(tmp, f"side{i + 1}")
                os.makedirs(d)
                dirs.append(d)
                local, remote = UNDERLAY[i], UNDERLAY[1 - i]
                ids = ("a", "b") if i == 0 else ("b", "a")
                with open(os.path.join(d, "swanctl.conf"), "w") as f:
                    f.write(_swanctl_conf(local, remote, *ids, psk))
                add_kernel_vxlan(ns, local, remote, INNER[i], mtu=1350)
                # Only VXLAN to the peer goes through libipsec's table 220 (ipsec0); IKE and
                # the UDP/4500 ESP packets themselves go out on the veth.
                run(["ip", "rule", "add", "pref", "218", "to", f"{remote}/32", "ipproto", "udp",
                     "dport", "4789", "lookup", "220"], ns=ns)
                run(["ip", "rule", "add", "pref", "219", "to", f"{remote}/32", "lookup", "main"],
                    ns=ns)
            for ns, d in zip(names, dirs, strict=True):
                try:
                    charons.append(start_charon(ns, d))
                except LabError as e:
                    raise BenchError(str(e)) from None
                _swanctl(ns, d, "--load-all", "--file", os.path.join(d, "swanctl.conf"))
            for child in ("vx-out", "vx-in"):
                _swanctl(names[0], dirs[0], "--initiate", "--child", child, "--timeout", "20")
            result = measure(names[0], names[1], INNER[1], seconds)
            # Make sure the VXLAN traffic really went through libipsec (ipsec0), not around it.
            tx = int(run(["cat", "/sys/class/net/ipsec0/statistics/tx_bytes"],
                         ns=names[0]).stdout)
            if tx < result["tcp_gbps"] * 1e9 * seconds / 8 / 2:
                raise BenchError(f"only {tx} bytes left through ipsec0: VXLAN bypassed ESP")
            return {**result, "vm_mtu": _mtu(names[0], "vx0")}
    finally:
        for p in charons:
            stop_charon(p)
        shutil.rmtree(tmp, ignore_errors=True)


def _swanctl(ns: str, d: str, *args: str) -> None:
    try:
        run(["swanctl", *args, "--uri", f"unix://{d}/charon.vici"], ns=ns, timeout=40)
    except LabError as e:
        raise BenchError(f"{e}; charon.log: {_log_tail(os.path.join(d, 'charon.log'))}") \
            from None


BENCHES: dict[str, Callable[[int], dict[str, Any]]] = {
    "espswitch-vxlanipsec-aes128gcm16": bench_espswitch_vxlanipsec,
    "espswitch-vxlan": bench_espswitch_vxlan,
    "kernel-vxlan": bench_kernel_vxlan,
    "strongswan-libipsec": bench_strongswan_libipsec,
}


# -- reporting -----------------------------------------------------------------------------

def ratios(results: list[dict[str, Any]]) -> dict[str, float | None]:
    by = {r["path"]: r.get("tcp_gbps") for r in results}
    base, ours = by.get(BASELINE), by.get("espswitch-vxlanipsec-aes128gcm16")
    return {"vxlanipsec_vs_libipsec": ours / base if ours and base else None}


def table(results: list[dict[str, Any]]) -> str:
    base = next((r.get("tcp_gbps") for r in results if r["path"] == BASELINE), None)
    lines = [f"{'path':<34} {'Gbit/s':>8} {'ping ms':>8} {'vs libipsec':>12}  load"]
    for r in results:
        g, p = r.get("tcp_gbps"), r.get("rtt_ms_avg")
        ratio = f"{g / base:.2f}x" if g is not None and base else "-"
        lines.append(f"{r['path']:<34} {_fmt(g, 3):>8} {_fmt(p, 3):>8} {ratio:>12}  "
                     f"{r['loadavg_1m']:.2f}"
                     + (f"  FAILED: {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def chart(results: list[dict[str, Any]], png: str, seconds: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["path"] for r in results]
    base = next((r.get("tcp_gbps") for r in results if r["path"] == BASELINE), None)
    colors = ["#1f77b4" if n.startswith("espswitch") else "#7f7f7f" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (("tcp_gbps", "iperf3 TCP throughput (Gbit/s)", "{:.2f}"),
              ("rtt_ms_avg", "ping RTT, average of 1000 (ms)", "{:.3f}"))
    for ax, (key, title, fmt) in zip(axes, panels, strict=True):
        values = [r.get(key) or 0.0 for r in results]
        bars = ax.bar(range(len(names)), values, color=colors)
        positive = [v for v in values if v > 0]
        if key == "tcp_gbps" and positive:
            ax.set_yscale("log")
            ax.set_ylim(10 ** math.floor(math.log10(min(positive) / 5)), max(positive) * 5)
            title += ", log scale"
        else:
            ax.set_ylim(0, max([*values, 1e-3]) * 1.2)
        floor = ax.get_ylim()[0]
        for bar, r in zip(bars, results, strict=True):
            v = r.get(key)
            label = "failed" if v is None else fmt.format(v)
            if key == "tcp_gbps" and v is not None and base:
                label += f"\n{v / base:.2f}x libipsec"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), floor)),
                        ha="center", va="bottom", fontsize=9)
        ax.set_title(title)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("-", "-\n", 1) for n in names], fontsize=8)
    loads = [r["loadavg_1m"] for r in results]
    fig.suptitle(f"VM to VM over VXLAN, one run, iperf3 TCP -t {seconds}; 2-core machine, "
                 f"1-min load {min(loads):.1f} to {max(loads):.1f} (espswitch in blue)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 s of iperf3 instead of 10 s")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated subset of: {', '.join(PATHS)}")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--png", metavar="FILE", default="e2e.png",
                    help="bar chart (default: %(default)s)")
    args = ap.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in BENCHES]
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if os.geteuid() != 0:
        print("e2e.py needs root (network namespaces)", file=sys.stderr)
        return 2
    seconds = 3 if args.quick else 10

    results: list[dict[str, Any]] = []
    for path in paths:
        print(f"== {path} ...", flush=True)
        entry: dict[str, Any] = {"path": path, "tcp_gbps": None, "rtt_ms_avg": None,
                                 "loadavg_1m": os.getloadavg()[0]}
        t0 = time.monotonic()
        try:
            entry.update(BENCHES[path](seconds))
        except (BenchError, LabError, OSError, subprocess.SubprocessError) as e:
            entry["error"] = str(e)
            print(f"   failed: {e}", flush=True)
        else:
            print(f"   {entry['tcp_gbps']:.3f} Gbit/s, ping {entry['rtt_ms_avg']:.3f} ms",
                  flush=True)
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        results.append(entry)

    print()
    print(table(results))
    out = {"results": results, "ratios": ratios(results), "iperf3_seconds": seconds}
    r = out["ratios"]["vxlanipsec_vs_libipsec"]
    if r is not None:
        print(f"\nespswitch vxlanipsec / strongSwan kernel-libipsec: {r:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    if args.png:
        chart(results, args.png, seconds)
        print(f"chart: {args.png}")
    return 1 if any("error" in e for e in results) else 0


if __name__ == "__main__":
    sys.exit(main())
