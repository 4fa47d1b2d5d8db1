"""espswitch's VXLAN against an independent implementation: the Linux kernel's."""

from __future__ import annotations

import pytest

from .lab import VM_MTU, iperf3, no_tx_offload, run, wait_until

pytestmark = pytest.mark.net


def test_vxlan_interoperates_with_the_kernel(lab):
    """Hypervisor A runs espswitch; B is a plain namespace with a kernel vxlan device."""
    a = lab.hypervisor("hva")
    a.start()
    b = lab.netns("kvx")
    run(["ip", "link", "add", "ul0", "netns", a.ns, "type", "veth", "peer", "name", "ul0",
         "netns", b])
    a.vsctl("add-br", "br-phy", "--", "add-port", "br-phy", "ul0")
    a.sh("ip", "addr", "add", "10.0.0.1/24", "dev", "br-phy")
    a.sh("ip", "link", "set", "br-phy", "up")
    # As with OVS's userspace datapath: a kernel sending into a veth that a packet socket
    # reads must compute its checksums itself (no tx checksum offload, hence no TSO/GSO).
    no_tx_offload(b, "ul0")
    vx = run(["ip", "link", "add", "vxlan0", "type", "vxlan", "id", "4242", "remote",
              "10.0.0.1", "local", "10.0.0.2", "dstport", "4789"], b, check=False)
    if vx.returncode != 0:
        pytest.skip(f"the kernel has no VXLAN devices here: {vx.stderr.strip()}")
    for cmd in (["ip", "addr", "add", "10.0.0.2/24", "dev", "ul0"],
                ["ip", "link", "set", "ul0", "up"],
                ["ip", "link", "set", "vxlan0", "mtu", str(VM_MTU), "up"],
                ["ip", "addr", "add", "192.168.10.2/24", "dev", "vxlan0"]):
        run(cmd, b)
    vm = lab.vm("vma", 1, "192.168.10.1")
    a.vsctl("add-br", "br-int")
    a.add_vm("br-int", vm)
    a.vsctl("add-port", "br-int", "vx0", "--", "set", "Interface", "vx0", "type=vxlan",
            "options:remote_ip=10.0.0.2", "options:key=4242")
    assert wait_until(lambda: vm.can_reach("192.168.10.2"), 5) is not None
    assert "50 received" in vm.ping("192.168.10.2", count=50).stdout
    # Full-size frames both ways: TCP at the VMs' MTU.
    assert iperf3(lab, vm, b, "192.168.10.2", 2)["bytes"] > 1_000_000
    # The kernel learned the VM's MAC behind espswitch's endpoint.
    fdb = run(["bridge", "fdb", "show", "dev", "vxlan0"], b).stdout
    assert f"{vm.mac} dst 10.0.0.1" in fdb, fdb
