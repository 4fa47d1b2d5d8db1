"""VLAN isolation, churn under traffic, crash and restart, and a clean stop."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from .lab import wait_until

pytestmark = pytest.mark.net


def test_vlan_tags_isolate_vms(lab):
    hv = lab.hypervisor("hv")
    hv.start()
    hv.vsctl("add-br", "br0")
    v1, v2, v3 = (lab.vm(f"v{n}", n, f"192.168.20.{n}") for n in (1, 2, 3))
    hv.add_vm("br0", v1, tag=10)
    hv.add_vm("br0", v2, tag=10)
    hv.add_vm("br0", v3, tag=20)
    assert "10 received" in v1.ping(v2.ip, count=10).stdout
    assert v1.ping(v3.ip, count=3, wait=1).returncode != 0
    assert v3.ping(v2.ip, count=3, wait=1).returncode != 0
    fdb = hv.appctl("fdb/show", "br0")
    assert re.search(rf"^\s+\d+\s+10\s+{v1.mac}", fdb, re.M), fdb
    assert re.search(rf"^\s+\d+\s+20\s+{v3.mac}", fdb, re.M), fdb
    assert "tag=20" in hv.appctl("dpif/show")
    # Moving v3 to VLAN 10 joins it to the others.
    hv.vsctl("set", "Port", v3.tap, "tag=10")
    assert wait_until(lambda: v3.can_reach(v2.ip), 5) is not None


def test_churn_forwarding_resumes_within_2s(fresh_tunnel):
    a, vma, vmb, lab = fresh_tunnel["a"], fresh_tunnel["vma"], fresh_tunnel["vmb"], \
        fresh_tunnel["lab"]
    assert wait_until(lambda: vma.can_reach(vmb.ip), 5) is not None
    stream = lab.spawn(vma.ns, "ping", "-q", "-i", "0.01", "-w", "60", vmb.ip)
    tunnel = ["--", "set", "Interface", "vx0", "type=vxlan", "options:remote_ip=10.0.0.2",
              "options:key=5000"]

    def resumed() -> float | None:
        return wait_until(lambda: vma.can_reach(vmb.ip), 2.0, 0.02)

    # 1. the tunnel port
    a.vsctl("del-port", "br-int", "vx0")
    assert not vma.can_reach(vmb.ip)
    a.vsctl("add-port", "br-int", "vx0", *tunnel)
    assert resumed() is not None, "no forwarding 2 s after re-adding the tunnel port"
    # 2. the VM port (its device goes away with it; the new one is plugged again)
    a.vsctl("del-port", "br-int", vma.tap)
    a.vsctl("add-port", "br-int", vma.tap, "--", "set", "Interface", vma.tap, "type=tap")
    a.plug(vma)
    assert resumed() is not None, "no forwarding 2 s after re-adding the VM port"
    # 3. the whole bridge
    a.vsctl("del-br", "br-int")
    a.vsctl("add-br", "br-int", "--", "add-port", "br-int", "vx0", *tunnel)
    a.add_vm("br-int", vma)
    assert resumed() is not None, "no forwarding 2 s after re-creating the bridge"
    assert a.alive()
    assert stream.poll() is None  # the background stream is still running
    stream.kill()


def test_restart_after_kill_and_clean_stop(lab):
    a, b = lab.hypervisor("hva"), lab.hypervisor("hvb")
    a.start()
    b.start()
    lab.underlay(a, b, "10.0.0.1", "10.0.0.2")

    def reach() -> bool:
        return a.sh("ping", "-c", "1", "-W", "1", "10.0.0.2", check=False).returncode == 0

    assert wait_until(reach, 5) is not None
    os.kill(a.pid(), signal.SIGKILL)
    assert wait_until(lambda: not a.alive(), 5) is not None
    a.start()
    took = wait_until(reach, 5)
    assert took is not None, "no traffic 5 s after restarting espswitchd"
    assert a.iface("ul0", "ofport") != "-1"
    # Stop leaves no process, device or socket behind.
    for hv in (a, b):
        pids = hv.pid("espswitchd"), hv.pid("ovsdb-server")
        hv.stop()
        for pid in pids:
            assert pid is not None
            assert wait_until(lambda pid=pid: not _running(pid), 5) is not None
        links = hv.sh("ip", "-o", "link", "show").stdout
        assert "br-phy" not in links, links
        left = [f for f in os.listdir(hv.dir) if f.endswith((".ctl", ".pid", ".sock"))]
        assert left == []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def test_vm_traffic_survives_kill_and_restart(fresh_tunnel):
    a, vma, vmb = fresh_tunnel["a"], fresh_tunnel["vma"], fresh_tunnel["vmb"]
    assert wait_until(lambda: vma.can_reach(vmb.ip), 5) is not None
    time.sleep(2.5)  # espswitchd notes where the VM's device went every 2 s
    os.kill(a.pid(), signal.SIGKILL)
    assert wait_until(lambda: not a.alive(), 5) is not None
    # The VM keeps its (persistent) device and addresses while the daemon is down.
    assert vma.tap in vma.sh("ip", "-o", "link", "show").stdout
    a.start()
    assert wait_until(lambda: vma.can_reach(vmb.ip), 5) is not None, \
        "no VM traffic 5 s after restarting espswitchd"
    assert "10 received" in vma.ping(vmb.ip, count=10).stdout
    # A clean stop removes the VM's device too.
    a.stop()
    assert vma.tap not in vma.sh("ip", "-o", "link", "show").stdout


def test_stop_after_crash_removes_devices_everywhere(fresh_tunnel):
    a, vma = fresh_tunnel["a"], fresh_tunnel["vma"]
    time.sleep(2.5)
    os.kill(a.pid(), signal.SIGKILL)
    assert wait_until(lambda: not a.alive(), 5) is not None
    a.stop()
    assert vma.tap not in vma.sh("ip", "-o", "link", "show").stdout
    links = a.sh("ip", "-o", "link", "show").stdout
    assert "br-int" not in links and "br-phy" not in links, links
