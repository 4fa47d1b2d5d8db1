"""Configuration holes an attacker or a typo finds (issue 9, D2-D4), through the daemon.

Each bad value gets one sentence in `Interface.error`; the daemon, the tunnel and its other
ports go on. Changing a manual SA's option and changing it back continues its sequence
numbers, so the peer's replay window keeps accepting it.
"""

from __future__ import annotations

import pytest

from .ipsec_helpers import (
    Keys,
    espswitchd_pid,
    keyed_lab,
    pin_neighbours,
    received,
    sa_rows,
    status,
    wait_for,
)

pytestmark = pytest.mark.net


def error(lab, hv, iface: str) -> str:
    return lab.vsctl(hv, "get", "interface", iface, "error").stdout.strip().strip('"')


def test_changing_spi_out_and_back_continues_the_sequence_numbers(netlab_ok):
    """D2: 0x1001 -> 0x1003 -> 0x1001 used to restart 0x1001 at 1; the peer dropped it as
    too old until the count passed where it had been (here: a window of 32, 200 pings)."""
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys, replay_window="32") as lab:
        hv1, _ = lab.hvs
        assert lab.wait_for_ping()
        pin_neighbours(lab)
        assert received(lab.ping(200, 0.005)) == 200
        seq_before = sa_rows(lab, 0)["out"]["seq"]
        assert seq_before >= 200
        other = hex(keys.spi_1to2 + 2)
        lab.vsctl(hv1, "set", "interface", "tun0", f"options:spi_out={other}")
        assert status(lab, 0)["spi_out"] == f"0x{keys.spi_1to2 + 2:08x}"
        lab.ping(3, 0.05)  # sealed under an SPI the peer does not know: lost
        lab.vsctl(hv1, "set", "interface", "tun0", f"options:spi_out={hex(keys.spi_1to2)}")
        assert wait_for(lambda: received(lab.ping(1, 0.2)) == 1, 10), sa_rows(lab, 1)
        assert received(lab.ping(20, 0.01)) == 20
        assert sa_rows(lab, 0)["out"]["seq"] > seq_before
        peer_in = sa_rows(lab, 1)["in"]
        assert peer_in["replayed"] == 0 and peer_in["too_old"] == 0, peer_in


BAD_VALUES = [
    # (interface type, options, words the error must contain)
    ("vxlan", {"remote_ip": "192.0.2.9", "dst_port": "500"}, "dst_port 500 is IKE's port"),
    ("vxlan", {"remote_ip": "192.0.2.9", "dst_port": "4500"}, "dst_port 4500 is IKE"),
    ("vxlan", {"remote_ip": "0.0.0.0"}, "remote_ip 0.0.0.0 is the unspecified address"),
    ("vxlan", {"remote_ip": "255.255.255.255"}, "is the broadcast address"),
    ("vxlan", {"remote_ip": "224.0.0.1"}, "is a multicast address"),
    ("vxlan", {"remote_ip": "192.0.2.1"}, "is an address of this hypervisor"),
    ("vxlan", {"remote_ip": "192.0.2.9", "key": "\u0661\u0660"}, "options:key"),
    ("vxlanipsec", {"remote_ip": "192.0.2.9", "esp": "aes128gcm16",
                    "spi_out": "\u0661\u0660\u0660\u0660\u0660", "spi_in": "0x2002",
                    "esp_key_out": "11" * 20, "esp_key_in": "22" * 20}, "options:spi_out"),
    ("vxlanipsec", {"remote_ip": "192.0.2.9", "spi_out": "0x3001", "spi_in": "0x3002",
                    "esp_key_out": "11" * 20, "esp_key_in": "22" * 20, "rekey_time": "-5"},
     "options:rekey_time applies to IKEv2-keyed tunnels only"),
    ("vxlanipsec", {"remote_ip": "192.0.2.9", "spi_out": "0x3001", "spi_in": "0x3002",
                    "esp_key_out": "11" * 20, "esp_key_in": "22" * 20, "ike": "garbage"},
     "options:ike applies to IKEv2-keyed tunnels only"),
]


def test_bad_values_get_one_sentence_each_and_the_tunnel_goes_on(netlab_ok):
    """D3/D4: each value is refused in Interface.error; the daemon, tun0 and the other
    ports keep working; deleting the bad port leaves no trace."""
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        hv1, _ = lab.hvs
        assert lab.wait_for_ping()
        pid = espswitchd_pid(lab, 0)
        for i, (kind, options, words) in enumerate(BAD_VALUES):
            name = f"bad{i}"
            args = [f"options:{k}={v}" for k, v in options.items()]
            lab.vsctl(hv1, "add-port", "br-int", name, "--", "set", "interface", name,
                      f"type={kind}", *args)
            msg = wait_for(lambda n=name: error(lab, hv1, n), 10)
            assert msg and words in msg, (options, msg)
            assert "\n" not in msg and "Traceback" not in msg
            assert "11" * 20 not in msg and "22" * 20 not in msg
            assert received(lab.ping(3, 0.05)) == 3, f"tun0 broken after {options}"
            lab.vsctl(hv1, "del-port", "br-int", name)
        assert espswitchd_pid(lab, 0) == pid
        assert error(lab, hv1, "tun0") == "[]"


def test_a_vxlan_tunnel_on_port_500_no_longer_swallows_ike(netlab_ok):
    """D3: `dst_port=500` was accepted and the datapath then took every IKE packet of the
    hypervisor; now it is refused and an IKE tunnel beside it comes up."""
    with keyed_lab(Keys.fresh("aes128gcm16")) as lab:
        hv1, hv2 = lab.hvs
        assert lab.wait_for_ping()
        lab.vsctl(hv1, "add-port", "br-int", "vx500", "--", "set", "interface", "vx500",
                  "type=vxlan", "options:remote_ip=192.0.2.2", "options:key=77",
                  "options:dst_port=500")
        assert "IKE" in wait_for(lambda: error(lab, hv1, "vx500"), 10)
        for hv, peer in ((hv1, hv2), (hv2, hv1)):
            lab.vsctl(hv, "add-port", "br-int", "ike0", "--", "set", "interface", "ike0",
                      "type=vxlanipsec", f"options:remote_ip={peer.underlay_ip}",
                      "options:key=88", "options:psk=swordfish-for-this-test")
        assert wait_for(lambda: status(lab, 0, "ike0").get("ipsec_state") == "established",
                        30), status(lab, 0, "ike0")


def test_a_local_ip_that_is_not_local_is_reported_until_it_is(netlab_ok):
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        hv1, _ = lab.hvs
        assert lab.wait_for_ping()
        lab.vsctl(hv1, "add-port", "br-int", "vx9", "--", "set", "interface", "vx9",
                  "type=vxlan", "options:remote_ip=192.0.2.2", "options:key=99",
                  "options:local_ip=192.0.2.77")
        assert wait_for(lambda: "local_ip 192.0.2.77 is not an address" in
                        status(lab, 0, "vx9").get("tunnel_problem", ""), 10), \
            status(lab, 0, "vx9")
        hv1.sh("ip", "addr", "add", "192.0.2.77/24", "dev", "br-phy")
        assert wait_for(lambda: "tunnel_problem" not in status(lab, 0, "vx9"), 15), \
            status(lab, 0, "vx9")
        assert received(lab.ping(3, 0.05)) == 3
