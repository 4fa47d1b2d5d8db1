"""Hypervisor/VM topologies for the end-to-end tests, built as an operator would.

The building blocks (`run`, `Topology` with netns()/hypervisor()/vm()/underlay()/spawn()/
close(), `Hypervisor`, `Vm`) are espswitch.cli.labkit's, the ones `espswitch demo` builds
its lab from: names unique to this test process, and `close()` removes everything.
"""

from __future__ import annotations

import json
import sys
import time

from espswitch.cli.labkit import VM_MTU, Topology, run

__all__ = ["VM_MTU", "Topology", "build_tunnel_lab", "iperf3", "no_tx_offload", "run",
           "wait_until"]

_NO_TX_OFFLOAD = """
import sys
from pyroute2 import Ethtool
e = Ethtool()
f = e.get_features(sys.argv[1])
for name in ("tx-checksum-ip-generic", "tx-checksum-ipv4", "tx-generic-segmentation",
             "tx-tcp-segmentation", "tx-udp-segmentation"):
    if name in f.features:
        f.features[name].enable = False
e.set_features(sys.argv[1], f)
"""


def no_tx_offload(ns: str, dev: str) -> None:
    """Turn tx checksum offload (hence TSO/GSO) off on `dev` in `ns`: a kernel sending into
    a veth that a packet socket reads must compute its checksums itself, as with OVS's
    userspace datapath."""
    run([sys.executable, "-c", _NO_TX_OFFLOAD, dev], ns)


def iperf3(lab: Topology, client, server_ns: str, server_ip: str, seconds: int,
           reverse: bool = False) -> dict:
    """iperf3 TCP for `seconds` from VM `client` to `server_ip` (a one-shot server started
    in `server_ns`), or back with `reverse`; the receiver's summary (`end.sum_received`),
    checked for errors."""
    server = lab.spawn(server_ns, "iperf3", "-s", "-1", "-B", server_ip)
    time.sleep(0.5)
    r = client.sh("iperf3", "-c", server_ip, "-t", str(seconds), "-J",
                  *(["-R"] if reverse else []), check=False, timeout=60 + seconds)
    server.wait(timeout=20)
    res = json.loads(r.stdout)
    assert "error" not in res, res.get("error")
    return res["end"]["sum_received"]


def wait_until(pred, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until `pred()` held, or None after `timeout`."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(interval)


def build_tunnel_lab(tmp: str, vni: int = 5000) -> tuple[Topology, dict]:
    """Two hypervisors (underlay 10.0.0.1/2) with one VM each on br-int, and a vxlan port."""
    lab = Topology(tmp)
    try:
        a, b = lab.hypervisor("hva"), lab.hypervisor("hvb")
        a.start()
        b.start()
        lab.underlay(a, b, "10.0.0.1", "10.0.0.2")
        vma, vmb = lab.vm("vma", 1, "192.168.10.1"), lab.vm("vmb", 2, "192.168.10.2")
        for hv, vm, remote in ((a, vma, "10.0.0.2"), (b, vmb, "10.0.0.1")):
            hv.vsctl("add-br", "br-int")
            hv.add_vm("br-int", vm)
            hv.vsctl("add-port", "br-int", "vx0", "--", "set", "Interface", "vx0", "type=vxlan",
                     f"options:remote_ip={remote}", f"options:key={vni}")
    except BaseException:
        lab.close()
        raise
    return lab, {"a": a, "b": b, "vma": vma, "vmb": vmb, "vni": vni}
