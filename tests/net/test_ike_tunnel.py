"""`vxlanipsec` keyed by IKEv2 (`options:psk`) in espswitchd, end to end on the lab.

One lab (two hypervisors, a VM on each) serves the module; each test first sets the tunnel
options it needs on both sides and waits for the state it expects, so the tests also run
alone. What is shown: VM-to-VM traffic over negotiated SAs, what the underlay carries (IKE,
then only ESP), a CHILD_SA rekey under traffic, UDP encapsulation, and a wrong PSK.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time

import pytest

from espswitch.cli.lab import Lab, run

from .ipsec_helpers import (
    PATTERN,
    BackgroundPing,
    established,
    ipsec_show,
    received,
    scapy,
    statistics,
    status,
    underlay_ipv4,
    wait_for,
)

pytestmark = pytest.mark.net

PSK = "ike-lab-psk-7d1c0e"
N_PINGS = 100


@pytest.fixture(scope="module")
def lab(netlab_ok):
    opts = {"psk": PSK}
    lab = Lab(tunnel_type="vxlanipsec", tunnel_options=(dict(opts), dict(opts)))
    with lab:
        yield lab


def set_options(lab: Lab, hv_index: int, **opts: str) -> None:
    lab.vsctl(lab.hvs[hv_index], "set", "interface", "tun0",
              *(f"options:{k}={v}" for k, v in opts.items()))


def configure(lab: Lab, **opts: str) -> tuple[dict, dict]:
    """The same options on both tunnels, then wait for the IKE SA and a working tunnel."""
    set_options(lab, 0, **opts)
    set_options(lab, 1, **opts)
    st = established(lab)
    assert lab.wait_for_ping(20), "the VMs never reached each other"
    return st




def daemon_logs(lab: Lab) -> str:
    text = ""
    for hv in lab.hvs:
        for path in glob.glob(os.path.join(hv.dir, "espswitchd*.log")):
            with open(path, errors="replace") as f:
                text += f.read()
    return text


def test_psk_100_pings_established_and_sas_shown(lab):
    configure(lab, psk=PSK, ipsec_encapsulation="no")
    ping = lab.ping(N_PINGS, 0.01)
    assert received(ping) == N_PINGS, ping.stdout

    def settled() -> tuple[dict, dict, str] | None:
        # Crossing initiations install a second pair and delete one of them; status is
        # written within about a second of that: read both sides and the SAs once they agree.
        st1, st2, show = status(lab, 0), status(lab, 1), ipsec_show(lab, 0)
        agree = st1.get("spi_out") == st2.get("spi_in") and st1.get("spi_in") == st2.get(
            "spi_out") and st1.get("spi_out", "?") in show and st1.get("spi_in", "?") in show
        return (st1, st2, show) if agree else None

    found = wait_for(settled, 10)
    assert found, (status(lab, 0), status(lab, 1), ipsec_show(lab, 0))
    st1, st2, show = found
    assert st1["ipsec_keying"] == "ikev2"
    ike = lab.appctl(lab.hvs[0], "ike/show").stdout
    assert "established" in ike and st1["spi_in"] in ike, ike
    for text in (show, ike, str(st1), str(st2), daemon_logs(lab)):
        assert PSK not in text


def test_underlay_shows_ike_then_only_esp(lab, tmp_path):
    s = scapy()
    configure(lab, psk=PSK, ipsec_encapsulation="no")
    pcap = str(tmp_path / "underlay.pcap")
    with lab.capture(0, pcap):
        # A new PSK on both sides: a fresh IKE_SA_INIT/IKE_AUTH on the wire, then traffic.
        st1, st2 = configure(lab, psk=PSK + "-2")
        ping = lab.ping(N_PINGS, 0.01, extra=["-p", PATTERN.hex()])
    assert received(ping) == N_PINGS, ping.stdout
    with open(pcap, "rb") as f:
        assert PATTERN not in f.read(), "the ping payload is visible on the underlay"
    pkts = underlay_ipv4(pcap)
    ike = [i for i, p in enumerate(pkts) if p.haslayer(s.UDP) and p[s.UDP].dport == 500]
    esp = [i for i, p in enumerate(pkts) if p[s.IP].proto == 50]
    assert ike, "no IKE on UDP 500"
    assert len(esp) >= 2 * N_PINGS, len(esp)
    # The new SAs (both directions) carry ESP only after the IKE exchanges (ESP before
    # them is the VMs' IPv6 chatter on the SAs this test replaced).
    new_spis = {int(st1["spi_out"], 16), int(st2["spi_out"], 16)}
    first_new = next(i for i in esp
                     if int.from_bytes(bytes(pkts[i][s.IP].payload)[:4], "big") in new_spis)
    assert ike[0] < first_new, "ESP on the new SAs before any IKE"
    others = [p.summary() for p in pkts
              if p[s.IP].proto != 50 and not (p.haslayer(s.UDP) and p[s.UDP].dport == 500
                                                and p[s.UDP].sport == 500)]
    assert not others, f"neither ESP nor IKE on the underlay: {others[:5]}"
    assert not any(p.haslayer(s.UDP) and 4789 in (p[s.UDP].sport, p[s.UDP].dport)
                   for p in pkts), "plaintext VXLAN on the underlay"


def test_rekey_under_traffic_keeps_pings_and_changes_spis(lab):
    before, _ = configure(lab, psk=PSK, ipsec_encapsulation="no")
    with BackgroundPing(lab, N_PINGS) as ping:
        time.sleep(0.5)  # the pings are under way
        out = lab.appctl(lab.hvs[0], "ike/rekey", "tun0").stdout
        assert "rekey started" in out, out
        after = wait_for(lambda: (st := status(lab, 0)).get("spi_out") != before["spi_out"]
                         and st, 10)
        assert after, status(lab, 0)
        done = ping.result()
    assert received(done) == N_PINGS, done.stdout
    assert after["ipsec_state"] == "established"
    assert after["spi_in"] != before["spi_in"]
    # The old inbound SA goes once IKE deletes it; the new pair stays in agreement.
    st1, st2 = established(lab)
    assert st1["spi_out"] == st2["spi_in"] and st1["spi_in"] == st2["spi_out"]
    assert received(lab.ping(20, 0.01)) == 20


def test_rekey_time_option_rekeys_by_itself(lab):
    before, _ = configure(lab, psk=PSK, ipsec_encapsulation="no", rekey_time="3")
    try:
        after = wait_for(lambda: (st := status(lab, 0)).get("spi_in") != before["spi_in"]
                         and st.get("ipsec_state") == "established" and st, 12)
        assert after, status(lab, 0)
        assert received(lab.ping(20, 0.01)) == 20
    finally:
        configure(lab, psk=PSK, rekey_time="3600")


def test_udp_encapsulation_carries_esp_in_udp_4500(lab, tmp_path):
    s = scapy()
    st1, _ = configure(lab, psk=PSK, ipsec_encapsulation="yes")
    assert st1["ipsec_encapsulation"] == "yes"
    pcap = str(tmp_path / "encap.pcap")
    with lab.capture(0, pcap):
        ping = lab.ping(N_PINGS, 0.01, extra=["-p", PATTERN.hex()])
    assert received(ping) == N_PINGS, ping.stdout
    pkts = underlay_ipv4(pcap)
    nat_t = [p for p in pkts if p.haslayer(s.UDP) and p[s.UDP].dport == 4500
             and bytes(p[s.UDP].payload)[:4] != b"\0\0\0\0"]
    assert len(nat_t) >= 2 * N_PINGS, len(nat_t)
    assert not [p for p in pkts if p[s.IP].proto == 50], "raw ESP despite ipsec_encapsulation"
    with open(pcap, "rb") as f:
        assert PATTERN not in f.read()
    configure(lab, psk=PSK, ipsec_encapsulation="no")


def test_wrong_psk_no_traffic_stays_connecting(lab):
    configure(lab, psk=PSK, ipsec_encapsulation="no")
    wrong = "not-the-" + PSK
    try:
        set_options(lab, 1, psk=wrong)
        assert wait_for(lambda: status(lab, 0).get("ipsec_state") == "connecting"
                        and status(lab, 1).get("ipsec_state") == "connecting", 10), \
            (status(lab, 0), status(lab, 1))
        ping = lab.ping(5, 0.2)
        assert received(ping) == 0, ping.stdout
        assert wait_for(lambda: "AUTHENTICATION_FAILED" in daemon_logs(lab), 10)
        st = (status(lab, 0), status(lab, 1))
        assert all(s["ipsec_state"] == "connecting" for s in st), st
        shown = [str(st), daemon_logs(lab), ipsec_show(lab, 1),
                 lab.appctl(lab.hvs[1], "ike/show").stdout,
                 run(["ovs-vsctl", "get", "interface", "tun0", "error"], ns=lab.hvs[1].ns,
                     env=lab.hvs[1].env).stdout]
        for text in shown:
            assert wrong not in text and PSK not in text
    finally:
        configure(lab, psk=PSK)


def test_bad_ike_options_go_to_interface_error(lab):
    hv = lab.hvs[0]
    try:
        for opt, value in (("ike", "aes128-md5-modp1"), ("rekey_time", "soon"),
                           ("dpd_delay", "-3")):
            set_options(lab, 0, **{opt: value})
            err = lab.vsctl(hv, "get", "interface", "tun0", "error").stdout
            assert f"options:{opt}" in err, err
            assert PSK not in err
            lab.vsctl(hv, "remove", "interface", "tun0", "options", opt)
    finally:
        configure(lab, psk=PSK)


# -- certificates ------------------------------------------------------------------------------


def _dn(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "espswitch test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_certs(lab: Lab) -> None:
    """A CA and one certificate per hypervisor, set as Open_vSwitch other_config."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, pub, signer, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=10)))
        if ca:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build(_dn("espswitch test CA"), _dn("espswitch test CA"), ca_key.public_key(),
               ca_key, True)
    for hv in lab.hvs:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(_dn(f"hv{hv.index + 1}"), ca.subject, key.public_key(), ca_key, False)
        paths = {n: os.path.join(hv.dir, f"{n}.pem") for n in ("cert", "key", "ca")}
        with open(paths["cert"], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(paths["key"], "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        with open(paths["ca"], "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
        lab.vsctl(hv, "set", "Open_vSwitch", ".",
                  f"other_config:certificate={paths['cert']}",
                  f"other_config:private_key={paths['key']}",
                  f"other_config:ca_cert={paths['ca']}")


def test_certificates_with_remote_name(netlab_ok):
    with Lab(tunnel_type="vxlanipsec") as lab:
        _write_certs(lab)
        for hv in lab.hvs:
            peer = f"C=CH, O=espswitch test, CN=hv{2 - hv.index}"
            lab.vsctl(hv, "set", "interface", "tun0", f'options:remote_name="{peer}"')
        st1, st2 = established(lab)
        assert st1["spi_out"] == st2["spi_in"]
        ping = lab.ping(N_PINGS, 0.01)
        assert received(ping) == N_PINGS, ping.stdout
        ike = lab.appctl(lab.hvs[0], "ike/show").stdout
        assert "certificates" in ike and "established" in ike, ike
        # The wrong peer name: no SA.
        lab.vsctl(lab.hvs[0], "set", "interface", "tun0",
                  'options:remote_name="C=CH, O=espswitch test, CN=someone else"')
        assert wait_for(lambda: status(lab, 0).get("ipsec_state") == "connecting", 10)
        assert received(lab.ping(3, 0.2)) == 0


GARBAGE_SENDER = r"""
import os, random, socket, struct, sys
dst = sys.argv[1]
rng = random.Random(7)
def ike_header(exch, flags, length, np=33):
    return os.urandom(8) + bytes(8) + bytes([np, 0x20, exch, flags]) + struct.pack("!II", 0, length)
msgs = [b"", b"\x00", b"\xff" * 3, os.urandom(27)]
for n in (28, 29, 100, 1000, 3000):
    msgs.append(ike_header(34, 0x08, n) + os.urandom(max(0, n - 28)))  # IKE_SA_INIT, junk body
msgs.append(ike_header(34, 0x08, 0xFFFFFFF0) + os.urandom(60))        # length past the datagram
msgs.append(ike_header(35, 0x08, 28 + 40, np=46) + os.urandom(40))     # IKE_AUTH for no SA
msgs.append(ike_header(37, 0x20, 28 + 40, np=46) + os.urandom(40))     # INFORMATIONAL, response
msgs += [os.urandom(rng.randrange(1, 1500)) for _ in range(200)]
sent = 0
for port in (500, 4500):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    for m in msgs:
        data = (b"\0\0\0\0" + m) if port == 4500 and rng.random() < 0.5 else m
        s.sendto(data, (dst, port))
        sent += 1
print(sent)
"""


def daemon_pids(lab: Lab) -> list[str]:
    pids = []
    for hv in lab.hvs:
        with open(os.path.join(hv.dir, "espswitchd.pid")) as f:
            pids.append(f.read().strip())
    return pids


def test_garbage_to_the_ike_ports_is_dropped_and_the_ike_sa_stays(lab):
    configure(lab, psk=PSK)

    def settled() -> dict | None:
        # Both ends initiate: the SA pair of a crossing settles a moment after the first.
        first = status(lab, 0)
        time.sleep(1.0)
        again = status(lab, 0)
        return again if again.get("spi_out") == first.get("spi_out") else None

    st1 = wait_for(settled, 15)
    assert st1, "the SA pair kept changing"
    pids = daemon_pids(lab)

    def dropped() -> int:
        shown = json.loads(lab.appctl(lab.hvs[1], "ike/show", "--json").stdout)
        return shown["messages"]["dropped"]

    before = dropped()
    out = run(["python3", "-c", GARBAGE_SENDER, lab.hvs[1].underlay_ip], ns=lab.hvs[0].ns)
    assert int(out.stdout) > 400
    # Everything on port 500 reaches the IKE layer and is dropped (counted), as is what
    # carries the non-ESP marker on 4500; the rest of 4500 is the datapath's (unknown SPI).
    assert wait_for(lambda: dropped() >= before + 200, 5), (before, dropped())
    assert daemon_pids(lab) == pids
    for hv in lab.hvs:
        assert lab.appctl(hv, "version").returncode == 0
    st = (status(lab, 0), status(lab, 1))
    assert all(s["ipsec_state"] == "established" for s in st), st
    assert st[0]["spi_out"] == st1["spi_out"]  # the same SAs: nothing was torn down
    assert received(lab.ping(20, 0.01)) == 20


def test_second_vni_to_the_same_peer_shares_the_ike_sa_and_child_sa(lab):
    """Two tenants' tunnels between the same two endpoints (VNI 5001 and 5002): one IKE SA
    and one CHILD_SA key both, each VNI's traffic reaches its own bridge, a tunnel whose IKE
    settings differ waits with the reason, and the second tunnel carries on alone when the
    first is deleted."""
    configure(lab, psk=PSK)
    hvs = lab.hvs
    addrs = ("198.51.101.1", "198.51.101.2")

    def add_tun1(i: int, **extra: str) -> None:
        hv, peer = hvs[i], hvs[1 - i]
        opts = {"remote_ip": peer.underlay_ip, "key": "5002", "psk": PSK, **extra}
        lab.vsctl(hv, "--may-exist", "add-br", "br-t2", "--", "--may-exist", "add-port",
                  "br-t2", "tun1", "--", "set", "interface", "tun1", "type=vxlanipsec",
                  *(f"options:{k}={v}" for k, v in opts.items()))

    def t2_ping(count: int = 1) -> int:
        r = run(["ping", "-n", "-q", "-c", str(count), "-i", "0.01", "-W", "1", addrs[1]],
                ns=hvs[0].ns, check=False)
        m = re.search(r"(\d+) received", r.stdout)
        return int(m.group(1)) if m else 0

    try:
        for i in (0, 1):
            add_tun1(i)
            run(["ip", "addr", "replace", f"{addrs[i]}/24", "dev", "br-t2"], ns=hvs[i].ns)
            run(["ip", "link", "set", "br-t2", "up"], ns=hvs[i].ns)
        assert wait_for(lambda: all(status(lab, i, "tun1").get("ipsec_state") == "established"
                                    for i in (0, 1)), 15), status(lab, 0, "tun1")
        for i in (0, 1):
            st0, st1 = status(lab, i), status(lab, i, "tun1")
            assert st1["ike_shared_with"] == "tun0" and st1["spi_out"] == st0["spi_out"], st1
        assert wait_for(lambda: t2_ping() == 1, 10)
        assert t2_ping(20) == 20
        assert received(lab.ping(20, 0.01)) == 20  # tenant 5001 unaffected
        assert wait_for(lambda: statistics(lab, 1, "tun1").get("rx_packets", 0) >= 20, 12)
        shown = json.loads(lab.appctl(hvs[0], "ike/show", "--json").stdout)["peers"]
        assert [p["interface"] for p in shown] == ["tun0"] and shown[0]["followers"] == ["tun1"]
        assert len([s for s in shown[0]["ike_sas"] if s["state"] == "established"]) == 1
        assert "tun1: esp=aes128gcm16 mode=transport encapsulation=none (SAs shared with tun0)" \
            in ipsec_show(lab, 0), ipsec_show(lab, 0)

        # Settings that cannot share one IKE SA: tun1 waits, says why; tun0 goes on.
        add_tun1(0, esp="aes256gcm16")
        assert wait_for(lambda: "differ" in status(lab, 0, "tun1").get("ike_error", ""), 5), \
            status(lab, 0, "tun1")
        assert status(lab, 0, "tun1")["ipsec_state"] == "connecting"
        assert received(lab.ping(5, 0.01)) == 5
        lab.vsctl(hvs[0], "remove", "interface", "tun1", "options", "esp")
        assert wait_for(lambda: t2_ping() == 1, 10)

        # The leader goes: tun1 keys itself (a new IKE SA) and carries VNI 5002 on.
        for hv in hvs:
            lab.vsctl(hv, "del-port", "br-int", "tun0")
        assert wait_for(lambda: all(status(lab, i, "tun1").get("ipsec_state") == "established"
                                    and "ike_shared_with" not in status(lab, i, "tun1")
                                    for i in (0, 1)), 20), status(lab, 0, "tun1")
        assert wait_for(lambda: t2_ping() == 1, 10)
        assert t2_ping(20) == 20
    finally:
        for i, hv in enumerate(hvs):
            lab.vsctl(hv, "--if-exists", "del-br", "br-t2")
            lab.vsctl(hv, "--may-exist", "add-port", "br-int", "tun0", "--", "set",
                      "interface", "tun0", *lab.tunnel_args(hv, hvs[1 - i]))
        configure(lab, psk=PSK)
