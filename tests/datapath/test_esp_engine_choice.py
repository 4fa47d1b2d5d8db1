"""Which ESP engine a protected tunnel's SAs use: the compiled fast path when it is built
and the datapath's `fast_path` is on (`other_config:fast-path`), else the Python engine;
both carry the same traffic."""

from __future__ import annotations

import pytest

from espswitch.datapath import fast
from espswitch.datapath.fast import is_compiled

from .helpers import Hypervisor, eth, ipv4, mac

KEY_AB, KEY_BA = bytes(range(20)), bytes(range(50, 70))
INNER = eth(mac(2), mac(1), ipv4("192.168.1.1", "192.168.1.2", 1, b"p" * 100))


def hypervisor(ip: str, remote: str, key_out: bytes, key_in: bytes, spi_out: int,
               spi_in: int, fast_path: bool) -> Hypervisor:
    hv = Hypervisor(ip, remote, tun_type="vxlan", tun_options={})
    hv.dp.fast_path = fast_path
    hv.dp.del_port("vx0")
    hv.tun = hv.dp.add_port("br-int", "vx0", "vxlanipsec", {
        "remote_ip": remote, "key": "100", "spi_out": hex(spi_out), "spi_in": hex(spi_in),
        "esp_key_out": key_out.hex(), "esp_key_in": key_in.hex()})
    return hv


@pytest.mark.parametrize(("fast_a", "fast_b"), [(True, True), (False, True), (True, False),
                                                (False, False)])
def test_compiled_and_python_engines_carry_traffic_to_each_other(fast_a, fast_b):
    if (fast_a or fast_b) and not fast.AVAILABLE:
        pytest.skip(fast.REASON)
    a = hypervisor("10.0.0.1", "10.0.0.2", KEY_AB, KEY_BA, 0x1001, 0x2002, fast_a)
    b = hypervisor("10.0.0.2", "10.0.0.1", KEY_BA, KEY_AB, 0x2002, 0x1001, fast_b)
    assert is_compiled(a.tun.esp.sa_out) == fast_a and is_compiled(b.tun.esp.sa_in) == fast_b
    engine = "compiled" if fast_a else "python"
    assert f"esp_engine={engine}" in a.tun.describe()
    b_mac = b.dev("br-phy").mac
    a.dp.neigh.learn("br-phy", bytes([10, 0, 0, 2]), b_mac, a.dp.now)
    for _ in range(3):
        a.inject("vm", INNER)
        out = [f for f in a.dev("eth0").take() if f[23] == 50]
        assert len(out) == 1
        b.inject("eth0", out[0])
        assert b.dev("vm").take() == [INNER]
    assert b.tun.esp.sa_in.counters()["packets"] == 3
    assert a.tun.esp.sa_out.seq == 3


def test_without_the_fast_path_new_sas_are_pythons():
    a = hypervisor("10.0.0.1", "10.0.0.2", KEY_AB, KEY_BA, 0x1001, 0x2002, False)
    assert not is_compiled(a.tun.esp.sa_out) and not is_compiled(a.tun.esp.sa_in)
    assert "esp_engine=python" in a.tun.describe()
