"""espswitch's tunnels against an independent implementation: the Linux kernel's VXLAN,
Geneve and GRE (gretap, with a key) devices."""

from __future__ import annotations

import pytest

from .lab import VM_MTU, iperf3, no_tx_offload, run, wait_until

pytestmark = pytest.mark.net


KINDS = {
    # espswitch interface type and options, the kernel's device
    "vxlan": ({"key": "4242"},
              ["type", "vxlan", "id", "4242", "remote", "10.0.0.1", "local", "10.0.0.2",
               "dstport", "4789"]),
    "geneve": ({"key": "4242"}, ["type", "geneve", "id", "4242", "remote", "10.0.0.1"]),
    "gre": ({"key": "4242"},
            ["type", "gretap", "key", "4242", "remote", "10.0.0.1", "local", "10.0.0.2"]),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tunnel_interoperates_with_the_kernel(lab, kind):
    """Hypervisor A runs espswitch; B is a plain namespace with the kernel's device."""
    options, device = KINDS[kind]
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
    vx = run(["ip", "link", "add", "vxlan0", *device], b, check=False)
    if vx.returncode != 0:
        pytest.skip(f"the kernel has no {kind} devices here: {vx.stderr.strip()}")
    for cmd in (["ip", "addr", "add", "10.0.0.2/24", "dev", "ul0"],
                ["ip", "link", "set", "ul0", "up"],
                ["ip", "link", "set", "vxlan0", "mtu", str(VM_MTU), "up"],
                ["ip", "addr", "add", "192.168.10.2/24", "dev", "vxlan0"]):
        run(cmd, b)
    vm = lab.vm("vma", 1, "192.168.10.1")
    a.vsctl("add-br", "br-int")
    a.add_vm("br-int", vm)
    a.vsctl("add-port", "br-int", "vx0", "--", "set", "Interface", "vx0", f"type={kind}",
            "options:remote_ip=10.0.0.2", *[f"options:{k}={v}" for k, v in options.items()])
    assert wait_until(lambda: vm.can_reach("192.168.10.2"), 5) is not None
    assert "50 received" in vm.ping("192.168.10.2", count=50).stdout
    # Full-size frames both ways: TCP at the VMs' MTU.
    assert iperf3(lab, vm, b, "192.168.10.2", 2)["bytes"] > 1_000_000
    assert iperf3(lab, vm, b, "192.168.10.2", 2, reverse=True)["bytes"] > 1_000_000
    if kind == "vxlan":
        # The kernel learned the VM's MAC behind espswitch's endpoint.
        fdb = run(["bridge", "fdb", "show", "dev", "vxlan0"], b).stdout
        assert f"{vm.mac} dst 10.0.0.1" in fdb, fdb
