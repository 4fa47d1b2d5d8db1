"""espswitch's `vxlan`, `geneve` and `gre` against Open vSwitch's own userspace datapath
(ovs-vswitchd, netdev).

Hypervisor A runs espswitch; hypervisor B runs Debian's ovs-vswitchd with
`datapath_type=netdev` (AF_PACKET `system` port, `tap` VM port, native tunneling), the
same topology configured with the same `ovs-vsctl` commands. The recipe is the one in
../shared/spec/references.md. (This machine's kernel has no geneve or gretap devices, so
Open vSwitch is the independent Geneve and GRE implementation here.)
"""

from __future__ import annotations

import shutil

import pytest

from .lab import iperf3, run, wait_until

pytestmark = pytest.mark.net

VNI = 4242


def start_ovs(hv) -> None:
    """ovsdb-server and ovs-vswitchd in `hv`'s namespace, with `hv`'s directories."""
    d = hv.dir
    hv.sh("ovsdb-tool", "create", f"{d}/conf.db", "/usr/share/openvswitch/vswitch.ovsschema")
    hv.sh("ovsdb-server", f"{d}/conf.db", f"--remote=punix:{d}/db.sock",
          f"--pidfile={d}/ovsdb-server.pid", f"--unixctl={d}/ovsdb-server.ctl",
          f"--log-file={d}/ovsdb-server.log", "--detach")
    hv.vsctl("--no-wait", "init")
    hv.sh("ovs-vswitchd", f"unix:{d}/db.sock", f"--pidfile={d}/ovs-vswitchd.pid",
          f"--log-file={d}/ovs-vswitchd.log", "--detach", timeout=60)


def stop_ovs(hv) -> None:
    for target in ("ovs-vswitchd", "ovsdb-server"):
        hv.sh("ovs-appctl", "-t", f"{hv.dir}/{target}.ctl" if target == "ovsdb-server"
              else target, "exit", check=False, timeout=20)


@pytest.mark.parametrize(("kind", "options"), [
    ("vxlan", [f"options:key={VNI}"]),
    ("geneve", [f"options:key={VNI}"]),
    ("gre", [f"options:key={VNI}"]),
    ("gre", ["options:key=7", "options:csum=true"]),
])
def test_tunnel_interoperates_with_open_vswitch_userspace_datapath(lab, tmp_path, kind,
                                                                    options):
    if shutil.which("ovs-vswitchd") is None:
        pytest.skip("needs ovs-vswitchd (Debian's openvswitch-switch)")
    a = lab.hypervisor("hva")
    a.start()
    b = lab.hypervisor("ovsb")
    start_ovs(b)
    try:
        run(["ip", "link", "add", "ul0", "netns", a.ns, "type", "veth", "peer", "name",
             "ul0", "netns", b.ns])
        a.vsctl("add-br", "br-phy", "--", "add-port", "br-phy", "ul0")
        b.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev",
                "--", "add-port", "br-phy", "ul0")
        for hv, ip in ((a, "10.0.0.1"), (b, "10.0.0.2")):
            hv.sh("ip", "link", "set", "ul0", "up")
            hv.sh("ip", "addr", "add", f"{ip}/24", "dev", "br-phy")
            hv.sh("ip", "link", "set", "br-phy", "up")
        vma, vmb = lab.vm("vma", 1, "192.168.10.1"), lab.vm("vmb", 2, "192.168.10.2")
        a.vsctl("add-br", "br-int")
        a.add_vm("br-int", vma)
        b.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=netdev")
        b.add_vm("br-int", vmb)
        for hv, remote in ((a, "10.0.0.2"), (b, "10.0.0.1")):
            hv.vsctl("add-port", "br-int", "vx0", "--", "set", "Interface", "vx0",
                     f"type={kind}", f"options:remote_ip={remote}", *options)

        assert wait_until(lambda: vma.can_reach(vmb.ip), 15) is not None, \
            b.sh("ovs-appctl", "dpif/show", check=False).stdout
        # -W 3: under a loaded CI machine a late reply is not a lost one.
        assert "50 received" in vma.ping(vmb.ip, count=50, wait=3).stdout
        assert "50 received" in vmb.ping(vma.ip, count=50, wait=3).stdout
        # Full-size frames both ways: TCP at the VMs' MTU, each side sending.
        for client, server in ((vma, vmb), (vmb, vma)):
            assert iperf3(lab, client, server.ns, server.ip, 2)["bytes"] > 1_000_000
        # Each learned the other's VM behind its tunnel port.
        assert vmb.mac in a.appctl("fdb/show", "br-int").stdout
        fdb_b = b.sh("ovs-appctl", "fdb/show", "br-int").stdout
        assert vma.mac in fdb_b, fdb_b
    finally:
        stop_ovs(b)
