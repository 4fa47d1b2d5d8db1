"""IKE-keyed `vxlanipsec` over its lifetime, end to end on the lab: bad certificate
configuration, a peer that dies and comes back (DPD), volume rekeys, and tunnel mode.

One lab (two hypervisors, each with a VM and a PSK-keyed tun0) serves the module; each test
sets the options it needs on both sides and puts the defaults back, so the tests also run
alone. Every check uses what an operator has: `ovs-vsctl`, `ovs-appctl`, `ping`, `tcpdump`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import time

import pytest

from espswitch.cli.lab import Lab, run

from .ipsec_helpers import (
    PATTERN,
    BackgroundPing,
    espswitchd_pid,
    ipsec_show,
    received,
    scapy,
    status,
    wait_for,
)
from .test_ike_tunnel import _write_certs, configure, established, set_options

pytestmark = pytest.mark.net

PSK = "ike-lifecycle-psk-51f0"
EXTRA = "tun1"  # a second tunnel on hypervisor 1's br-int, keyed with certificates


@pytest.fixture(scope="module")
def lab(netlab_ok):
    opts = {"psk": PSK}
    with Lab(tunnel_type="vxlanipsec", tunnel_options=(dict(opts), dict(opts))) as lab:
        yield lab


def column(lab: Lab, hv_index: int, iface: str, col: str) -> str:
    """`ovs-vsctl get interface IFACE COL`, unquoted ("" for an empty error)."""
    out = lab.vsctl(lab.hvs[hv_index], "get", "interface", iface, col).stdout.strip()
    if out == "[]":
        return ""
    return json.loads(out) if out.startswith('"') else out


def sas_of(lab: Lab, hv_index: int, iface: str = "tun0") -> list[dict]:
    """ipsec/show --json rows of one interface."""
    return json.loads(ipsec_show(lab, hv_index, "--json", iface))["sas"]


def active_spis(lab: Lab, hv_index: int) -> tuple[str | None, str | None]:
    """(outbound, inbound) SPI of tun0's SA pair in use, from ipsec/show."""
    rows = {r["direction"]: r["spi"] for r in sas_of(lab, hv_index) if r["state"] == "active"}
    return rows.get("out"), rows.get("in")


def pairs_agree(lab: Lab) -> bool:
    (out1, in1), (out2, in2) = active_spis(lab, 0), active_spis(lab, 1)
    return out1 is not None and (out1, in1) == (in2, out2)


def pings_ok(lab: Lab, n: int = 5) -> None:
    """A whole burst of `n` pings gets through (within 10 s: on a loaded machine a ping may
    be lost while SAs that just crossed settle; what must hold is that traffic flows)."""
    last: list[str] = []

    def whole() -> bool:
        ping = lab.ping(n, 0.05)
        last[:] = [ping.stdout]
        return received(ping) == n

    assert wait_for(whole, 10), last[0]


# -- 1. bad certificate configuration is a configuration error ----------------------------------


def test_bad_certificate_configuration_goes_to_interface_error(lab):
    """Each unusable certificate setting puts one sentence naming the option and the path
    in Interface.error of the certificate-keyed tun1 (not created), while tun0 on the same
    bridge keeps carrying pings; fixing the setting, or only the file, clears it."""
    configure(lab, psk=PSK)
    hv = lab.hvs[0]
    _write_certs(lab)  # a CA and a certificate per hypervisor, in other_config
    cert, key, ca = (os.path.join(hv.dir, f"{n}.pem") for n in ("cert", "key", "ca"))
    peer_cert, peer_key = (os.path.join(lab.hvs[1].dir, f"{n}.pem") for n in ("cert", "key"))
    missing = os.path.join(hv.dir, "no-such-file.pem")
    garbage = os.path.join(hv.dir, "garbage.pem")
    with open(garbage, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with open(key) as f:
        key_lines = [ln for ln in f.read().splitlines() if ln and not ln.startswith("-----")]
    good_oc = {"certificate": cert, "private_key": key, "ca_cert": ca}

    def other_config(**oc: str) -> None:
        lab.vsctl(hv, "set", "Open_vSwitch", ".",
                  *(f"other_config:{k}={v}" for k, v in {**good_oc, **oc}.items()))

    def tun1_works() -> bool:
        return column(lab, 0, EXTRA, "error") == "" and \
            column(lab, 0, EXTRA, "ofport") not in ("-1", "[]") and \
            status(lab, 0, EXTRA).get("ipsec_state") == "connecting"

    def refused(option: str, path: str | None, why: str) -> str:
        err = column(lab, 0, EXTRA, "error")
        assert option in err and why in err, err
        if path is not None:
            assert path in err, err
        assert "\n" not in err and not any(ln in err for ln in key_lines), err
        assert column(lab, 0, EXTRA, "ofport") == "-1"
        assert EXTRA not in lab.appctl(hv, "dpif/show").stdout
        return err

    try:
        # remote_ip 192.0.2.3 answers nobody: a working tun1 stays "connecting".
        lab.vsctl(hv, "add-port", "br-int", EXTRA, "--", "set", "interface", EXTRA,
                  "type=vxlanipsec", "options:remote_ip=192.0.2.3", "options:key=5002",
                  f"options:remote_cert={peer_cert}")
        assert tun1_works(), (column(lab, 0, EXTRA, "error"), status(lab, 0, EXTRA))

        bad_options = [
            (f"options:remote_cert={missing}", "options:remote_cert", missing,
             "No such file or directory"),
            (f"options:remote_cert={hv.dir}", "options:remote_cert", hv.dir,
             "not a regular file"),
            (f"options:remote_cert={garbage}", "options:remote_cert", garbage,
             "not a PEM certificate"),
        ]
        for setting, option, path, why in bad_options:
            lab.vsctl(hv, "set", "interface", EXTRA, setting)
            refused(option, path, why)
            pings_ok(lab)
            lab.vsctl(hv, "set", "interface", EXTRA, f"options:remote_cert={peer_cert}")
            assert tun1_works(), column(lab, 0, EXTRA, "error")

        bad_other_config = [
            ({"certificate": missing}, "other_config:certificate", missing, "No such file"),
            ({"certificate": garbage}, "other_config:certificate", garbage,
             "not a PEM certificate"),
            ({"private_key": missing}, "other_config:private_key", missing, "No such file"),
            ({"private_key": cert}, "other_config:private_key", cert,
             "not an unencrypted PEM private key"),
            ({"private_key": peer_key}, "other_config:private_key", peer_key,
             "is not the key of other_config:certificate"),
            ({"ca_cert": hv.dir}, "other_config:ca_cert", hv.dir, "not a regular file"),
            ({"ca_cert": garbage}, "other_config:ca_cert", garbage, "not a PEM certificate"),
        ]
        for oc, option, path, why in bad_other_config:
            other_config(**oc)
            refused(option, path, why)
            pings_ok(lab)
            other_config()
            assert tun1_works(), column(lab, 0, EXTRA, "error")

        # No private key configured at all.
        lab.vsctl(hv, "remove", "Open_vSwitch", ".", "other_config", "private_key")
        refused("other_config:private_key", None, "")
        other_config()
        assert tun1_works(), column(lab, 0, EXTRA, "error")

        # The file goes bad under a working tunnel, then is repaired, with no database
        # change either time: espswitchd notices both.
        with open(ca, "rb") as f:
            good_ca = f.read()
        with open(ca, "w") as f:
            f.write("garbage\n")
        assert wait_for(lambda: column(lab, 0, EXTRA, "error"), 10), status(lab, 0, EXTRA)
        refused("other_config:ca_cert", ca, "not a PEM certificate")
        pings_ok(lab)
        with open(ca, "wb") as f:
            f.write(good_ca)
        assert wait_for(tun1_works, 10), column(lab, 0, EXTRA, "error")
        pings_ok(lab, 20)
        assert status(lab, 0)["ipsec_state"] == "established"
    finally:
        lab.vsctl(hv, "--if-exists", "del-port", "br-int", EXTRA)
        for h in lab.hvs:
            lab.vsctl(h, "remove", "Open_vSwitch", ".", "other_config", "certificate",
                      "private_key", "ca_cert")


# -- 2. dead peer detection -----------------------------------------------------------------


DPD_DELAY = 2
# From the peer's death to its SAs' removal: at most dpd_delay of silence, then a liveness
# check unanswered for 10 s (espswitchd's shortest DPD timeout), then a little slack.
DPD_BOUND = DPD_DELAY + 10 + 3.0


def _start_daemon(lab: Lab, hv_index: int) -> None:
    hv = lab.hvs[hv_index]
    run(["espswitch", "start"], ns=hv.ns, env=hv.env, timeout=60)


def _vm_tap_noted(lab: Lab, hv_index: int) -> bool:
    """espswitchd has written down which namespace its VM's TAP device lives in (it looks
    every so often), so that a restarted daemon finds the device there."""
    hv = lab.hvs[hv_index]
    try:
        with open(os.path.join(hv.dir, "espswitchd.taps.json")) as f:
            return json.load(f).get(hv.tap, "").endswith("/" + hv.vm_ns)
    except (OSError, ValueError):
        return False


def _daemon_alive(lab: Lab, hv_index: int) -> bool:
    try:
        os.kill(espswitchd_pid(lab, hv_index), 0)
    except (OSError, ValueError):
        return False
    return True


def test_dpd_removes_a_dead_peers_sas_and_the_peer_comes_back(lab):
    """hv2's espswitchd is killed: within DPD_BOUND hv1 has removed the SAs (ipsec/show has
    none for tun0, ipsec_state=connecting, ike_error says the peer is dead); once hv2's
    daemon is started again the tunnel is negotiated anew and carries 20/20 pings."""
    before, _ = configure(lab, psk=PSK, dpd_delay=str(DPD_DELAY))
    assert wait_for(lambda: _vm_tap_noted(lab, 1), 5)
    try:
        pid = espswitchd_pid(lab, 1)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_for(lambda: not _daemon_alive(lab, 1), 5)

        def gone() -> dict | None:
            st = status(lab, 0)
            return st if st.get("ipsec_state") == "connecting" and not sas_of(lab, 0) else None

        st = wait_for(gone, DPD_BOUND + 5, 0.5)
        took = time.monotonic() - t0
        assert st, (status(lab, 0), sas_of(lab, 0))
        assert took <= DPD_BOUND, f"dead peer's SAs removed only after {took:.1f} s"
        assert "spi_out" not in st and "dead" in st.get("ike_error", ""), st
        ike = json.loads(lab.appctl(lab.hvs[0], "ike/show", "--json", "tun0").stdout)
        assert not [s for s in ike["peers"][0]["ike_sas"] if s["state"] == "established"], ike
        assert received(lab.ping(2, 0.2)) == 0

        # The peer comes back (its configuration from OVSDB) and the tunnel with it.
        _start_daemon(lab, 1)
        established(lab, 30)
        assert wait_for(lambda: pairs_agree(lab), 10), (active_spis(lab, 0),
                                                       active_spis(lab, 1))
        assert set(active_spis(lab, 0)).isdisjoint({before["spi_in"], before["spi_out"]})
        assert lab.wait_for_ping(20)
        pings_ok(lab, 20)
    finally:
        if not _daemon_alive(lab, 1):
            _start_daemon(lab, 1)
        configure(lab, psk=PSK, dpd_delay="30")


# -- 3. volume rekeys -----------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "size"), [
    ("rekey_packets", "50", 56),
    ("rekey_bytes", "30000", 1000),
])
def test_volume_rekeys_change_spis_without_losing_pings(lab, option, value, size):
    """rekey_packets / rekey_bytes set on a running tunnel: under 150 pings the SA pair in
    use (ipsec/show) is replaced several times and not one ping is lost."""
    configure(lab, psk=PSK)
    n = 150
    try:
        configure(lab, psk=PSK, **{option: value})
        with BackgroundPing(lab, n, size=size) as ping:
            seen = [active_spis(lab, 0)[0]]
            while ping.running():
                spi = active_spis(lab, 0)[0]
                if spi and spi != seen[-1]:
                    seen.append(spi)
                time.sleep(0.05)
            done = ping.result()
        assert received(done) == n, done.stdout
        # n packets each way, a rekey every 50 (or 30 packets of 1000 bytes) at the latest:
        # several new SA pairs, each used in turn.
        assert len(set(seen)) >= 3, seen
        assert wait_for(lambda: pairs_agree(lab), 10), (active_spis(lab, 0),
                                                       active_spis(lab, 1))
        assert received(lab.ping(10, 0.02)) == 10
    finally:
        for hv in lab.hvs:
            lab.vsctl(hv, "remove", "interface", "tun0", "options", option)


# -- 4. tunnel mode -------------------------------------------------------------------------


def _esp_lengths(pcap: str) -> collections.Counter:
    s = scapy()
    return collections.Counter(
        p[s.IP].len for p in s.rdpcap(pcap)
        if p.haslayer(s.IP) and p[s.IP].proto == 50 and p[s.IP].src == "192.0.2.1"
        and p[s.IP].dst == "192.0.2.2")


def test_ipsec_mode_tunnel_keyed_by_ike(lab, tmp_path):
    """Tunnel mode negotiated by IKE: both sides say so, 20/20 pings, and on the wire each
    ESP packet is exactly one inner IPv4 header (20 bytes) longer than in transport mode."""
    size = 300
    lengths = {}
    try:
        for mode in ("transport", "tunnel"):
            st1, st2 = configure(lab, psk=PSK, ipsec_mode=mode)
            assert st1["ipsec_mode"] == st2["ipsec_mode"] == mode, (st1, st2)
            pcap = str(tmp_path / f"{mode}.pcap")
            with lab.capture(0, pcap):
                ping = lab.ping(20, 0.01, size=size, extra=["-p", PATTERN.hex()])
            assert received(ping) == 20, ping.stdout
            with open(pcap, "rb") as f:
                assert PATTERN not in f.read()
            common = _esp_lengths(pcap).most_common(1)
            assert common and common[0][1] >= 20, common
            lengths[mode] = common[0][0]
            assert {r["mode"] for r in sas_of(lab, 0)} == {mode}
            ike = json.loads(lab.appctl(lab.hvs[0], "ike/show", "--json", "tun0").stdout)
            children = [c for s in ike["peers"][0]["ike_sas"] if s["state"] == "established"
                        for c in s["children"]]
            assert children and {c["mode"] for c in children} == {mode}, ike
        assert lengths["tunnel"] - lengths["transport"] == 20, lengths
    finally:
        with contextlib.suppress(Exception):
            set_options(lab, 0, ipsec_mode="transport")
            set_options(lab, 1, ipsec_mode="transport")
