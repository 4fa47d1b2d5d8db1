"""espswitch's tunnels over an IPv6 underlay against the Linux kernel's VXLAN, Geneve and
GRE (ip6gretap) devices, as plain peers: pings and iperf3 both ways, IPv4 and IPv6 inside;
and the route and neighbour commands for IPv6 (ovs/route/*, tnl/neigh/*)."""

from __future__ import annotations

import tempfile

import pytest

from .lab import VM_MTU, Topology, iperf3, no_tx_offload, run, wait_until

pytestmark = pytest.mark.net

A6, B6 = "2001:db8:e5::1", "2001:db8:e5::2"
# 20 bytes less than over IPv4: the outer header is 40 bytes, not 20.
MTU6 = VM_MTU - 20

KINDS = {
    # espswitch interface type and options, the kernel's device. The kernel's UDP tunnels
    # over IPv6 send and require UDP checksums by default (udp6zerocsum* off);
    # ip6gretap's encapsulation limit option (a destination options header) is turned off:
    # espswitch does not walk extension headers.
    "vxlan": ({"key": "4242"},
              ["type", "vxlan", "id", "4242", "remote", A6, "local", B6, "dstport", "4789"]),
    "geneve": ({"key": "4242"}, ["type", "geneve", "id", "4242", "remote", A6]),
    "gre": ({"key": "4242"},
            ["type", "ip6gretap", "key", "4242", "remote", A6, "local", B6,
             "encaplimit", "none"]),
}


@pytest.fixture
def lab6(netlab_ok):
    """Namespaces that keep IPv6 (the underlay needs it)."""
    lab = Topology(tempfile.mkdtemp(prefix="espswitch-net6-"), ipv6=True)
    yield lab
    lab.close()


def kernel_peer(lab: Topology, kind: str):
    """Hypervisor A (espswitch, a VM behind tunnel vx0) and namespace B with the kernel's
    device: (a, vm, b)."""
    options, device = KINDS[kind]
    a = lab.hypervisor("hva")
    a.start()
    b = lab.netns("kvx")
    run(["ip", "link", "add", "ul0", "netns", a.ns, "type", "veth", "peer", "name", "ul0",
         "netns", b])
    a.vsctl("add-br", "br-phy", "--", "add-port", "br-phy", "ul0")
    a.sh("ip", "addr", "add", f"{A6}/64", "dev", "br-phy", "nodad")
    a.sh("ip", "link", "set", "br-phy", "up")
    no_tx_offload(b, "ul0")  # see test_interop.py
    vx = run(["ip", "link", "add", "vxlan0", *device], b, check=False)
    if vx.returncode != 0:
        pytest.skip(f"the kernel has no {kind} over IPv6 here: {vx.stderr.strip()}")
    for cmd in (["ip", "addr", "add", f"{B6}/64", "dev", "ul0", "nodad"],
                ["ip", "link", "set", "ul0", "up"],
                ["ip", "link", "set", "vxlan0", "mtu", str(MTU6), "up"],
                ["ip", "addr", "add", "192.168.10.2/24", "dev", "vxlan0"],
                ["ip", "addr", "add", "fd10::2/64", "dev", "vxlan0", "nodad"]):
        run(cmd, b)
    vm = lab.vm("vma", 1, "192.168.10.1")
    vm.mtu = MTU6
    a.vsctl("add-br", "br-int")
    a.add_vm("br-int", vm)
    vm.sh("ip", "addr", "add", "fd10::1/64", "dev", vm.tap, "nodad")
    a.vsctl("add-port", "br-int", "vx0", "--", "set", "Interface", "vx0", f"type={kind}",
            f"options:remote_ip={B6}", *[f"options:{k}={v}" for k, v in options.items()])
    return a, vm, b


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tunnel_over_ipv6_interoperates_with_the_kernel(lab6, kind):
    a, vm, b = kernel_peer(lab6, kind)
    assert wait_until(lambda: vm.can_reach("192.168.10.2"), 10) is not None
    assert "50 received" in vm.ping("192.168.10.2", count=50).stdout
    # IPv6 inside the IPv6 tunnel.
    assert wait_until(lambda: vm.can_reach("fd10::2"), 10) is not None
    assert "20 received" in vm.ping("fd10::2", count=20).stdout
    # And the kernel side starts a conversation too (it resolves the VM by itself).
    back = run(["ping", "-q", "-c", "5", "-i", "0.05", "-W", "2", "192.168.10.1"], b,
               check=False)
    assert "5 received" in back.stdout, back.stdout
    # Full-size frames both ways: TCP at the VMs' MTU.
    assert iperf3(lab6, vm, b, "192.168.10.2", 2)["bytes"] > 1_000_000
    assert iperf3(lab6, vm, b, "192.168.10.2", 2, reverse=True)["bytes"] > 1_000_000
    assert a.iface("vx0", "status").count(f'tunnel_mtu="{MTU6}"') == 1
    assert "tunnel_problem" not in a.iface("vx0", "status")
    if kind == "vxlan":
        # The kernel learned the VM's MAC behind espswitch's IPv6 endpoint.
        fdb = run(["bridge", "fdb", "show", "dev", "vxlan0"], b).stdout
        assert f"{vm.mac} dst {A6}" in fdb, fdb
        # A kernel VXLAN whose MTU exceeds what the underlay carries: after learning the
        # path MTU (it may drop the first packet meanwhile) it fragments the inner IPv4
        # packets, which cross espswitch as any inner fragments do. (It does not fragment
        # the outer packet; outer reassembly is tested in memory, tests/datapath.)
        run(["ip", "link", "set", "vxlan0", "mtu", "1500"], b)
        run(["ping", "-c", "1", "-W", "1", "-s", "1420", "192.168.10.1"], b, check=False)
        big = run(["ping", "-q", "-c", "5", "-i", "0.05", "-W", "2", "-s", "1420",
                   "192.168.10.1"], b, check=False)
        assert "5 received" in big.stdout, big.stdout + big.stderr
    # The next hop was found by neighbour discovery, in the datapath's own cache.
    mac_b = run(["cat", "/sys/class/net/ul0/address"], b).stdout.strip()
    neigh = a.appctl("tnl/neigh/show").stdout
    assert any(B6 in line and mac_b in line and "br-phy" in line
               for line in neigh.splitlines()), neigh


def test_ipv6_route_and_neighbour_commands(lab6):
    a, vm, _b = kernel_peer(lab6, "vxlan")
    routes = a.appctl("ovs/route/show").stdout
    assert "Cached: 2001:db8:e5::/64 dev br-phy" in routes, routes
    # A user route through a gateway: the tunnel follows it, and solicits the gateway.
    a.appctl("ovs/route/add", "2001:db8:77::/48", "br-phy", "2001:db8:e5::fe")
    routes = a.appctl("ovs/route/show").stdout
    assert f"User: 2001:db8:77::/48 dev br-phy GW 2001:db8:e5::fe SRC {A6}" in routes, routes
    bad = a.appctl("ovs/route/add", "2001:db8:78::/48", "br-phy", "10.0.0.1", check=False)
    assert bad.returncode != 0 and "family" in bad.stderr
    bad = a.appctl("ovs/route/add", "2001:db8::zz/48", "br-phy", check=False)
    assert bad.returncode != 0 and "bad route" in bad.stderr
    a.appctl("ovs/route/del", "2001:db8:77::/48")
    assert "2001:db8:77::" not in a.appctl("ovs/route/show").stdout
    gone = a.appctl("ovs/route/del", "2001:db8:77::/48", check=False)
    assert gone.returncode != 0
    # The neighbour cache by hand: set, show, flush; a bad address is refused.
    a.appctl("tnl/neigh/set", "br-phy", "2001:db8:e5::99", "02:00:00:00:00:99")
    assert "2001:db8:e5::99" in a.appctl("tnl/neigh/show").stdout
    a.appctl("tnl/arp/set", "br-phy", "2001:db8:e5::98", "02:00:00:00:00:98")
    assert "02:00:00:00:00:98" in a.appctl("tnl/arp/show").stdout
    bad = a.appctl("tnl/neigh/set", "br-phy", "2001:db8:e5::zz", "02:00:00:00:00:99",
                   check=False)
    assert bad.returncode != 0 and "bad IP address" in bad.stderr
    a.appctl("tnl/neigh/flush")
    assert "2001:db8:e5::99" not in a.appctl("tnl/neigh/show").stdout
    # After the flush the tunnel finds its next hop again by neighbour discovery.
    assert wait_until(lambda: vm.can_reach("192.168.10.2"), 10) is not None
    assert B6 in a.appctl("tnl/neigh/show").stdout
    # Mixed families in one interface are one clear error; the daemon goes on.
    a.vsctl("add-port", "br-int", "bad0", "--", "set", "Interface", "bad0", "type=vxlan",
            f"options:remote_ip={B6}", "options:local_ip=10.0.0.1", "options:key=9")
    err = a.iface("bad0", "error")
    assert "different families" in err, err
    assert "5 received" in vm.ping("192.168.10.2", count=5).stdout
