"""The compiled fast path in a running espswitchd, and `other_config:fast-path=false`.

By default a tunnel's SAs are the compiled ones (dpif/show: esp_engine=compiled); with
`other_config:fast-path=false` the SAs installed from then on are the Python engine's, and
a compiled side and a Python side carry traffic to each other (the same wire format).
IKE-keyed ESP over Geneve (Open vSwitch IPsec's `geneve` with `options:psk`) and ESP over
an IPv6 underlay take the fast path both ways (dpif/show's markers and counters).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time

import pytest

from espswitch.cli.lab import UNDERLAY6, Lab
from espswitch.datapath import fast

from .ipsec_helpers import (
    Keys,
    espswitchd_pid,
    iperf3,
    keyed_lab,
    received,
    sa_rows,
    status,
    wait_for,
)

pytestmark = pytest.mark.net


def engine(lab, i: int) -> str:
    out = lab.appctl(lab.hvs[i], "dpif/show").stdout
    return out.split("esp_engine=", 1)[1].split(")")[0].split(",")[0] if "esp_engine=" in out \
        else ""


def log_of(hv) -> str:
    with open(os.path.join(hv.dir, "espswitchd.log")) as f:
        return f.read()


def test_fast_path_by_default_and_python_engine_when_switched_off(netlab_ok):
    if not fast.AVAILABLE:
        pytest.skip(fast.REASON)
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        hv1, _ = lab.hvs
        assert lab.wait_for_ping()
        assert engine(lab, 0) == "compiled" and engine(lab, 1) == "compiled"
        assert received(lab.ping(100, 0.005)) == 100
        # A value that is neither true nor false: warned about, the default kept.
        lab.vsctl(hv1, "set", "Open_vSwitch", ".", "other_config:fast-path=maybe")
        assert "other_config:fast-path must be true or false" in log_of(hv1)
        lab.vsctl(hv1, "set", "Open_vSwitch", ".", "other_config:fast-path=false")
        assert "fast path: off (other_config:fast-path=false)" in log_of(hv1)
        # It applies to SAs installed from now on: restart hv1's daemon (a crash: its VM
        # keeps its device; its manually keyed SAs come back with their sequence numbers
        # past what they sent).
        time.sleep(1.0)  # espswitchd notes where the VM's device went every 0.5 s
        pid = espswitchd_pid(lab, 0)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)
        hv1.start()
        assert wait_for(lambda: engine(lab, 0) == "python", 10), engine(lab, 0)
        assert engine(lab, 1) == "compiled"
        assert wait_for(lambda: received(lab.ping(1, 0.2)) == 1, 10)
        assert received(lab.ping(100, 0.005)) == 100  # Python side <-> compiled side
        assert sa_rows(lab, 1)["in"]["replayed"] == 0
        lab.vsctl(hv1, "set", "Open_vSwitch", ".", "other_config:fast-path=true")
        assert "fast path: on" in log_of(hv1).rsplit("fast path: off", 1)[-1]


def fast_counters(lab, i: int) -> dict[str, int]:
    """The fast-path counters of dpif/show on hypervisor i."""
    out = lab.appctl(lab.hvs[i], "dpif/show").stdout
    line = next(ln for ln in out.splitlines() if "fast-path: enabled" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.mark.parametrize("kind", ["geneve-psk", "vxlanipsec-ipv6", "geneve-ipv6-clear"])
def test_geneve_and_ipv6_tunnels_take_the_fast_path(netlab_ok, kind):
    if not fast.AVAILABLE:
        pytest.skip(fast.REASON)
    if kind == "geneve-psk":
        psk = {"psk": secrets.token_hex(16)}
        lab = Lab(tunnel_type="geneve", tunnel_options=(psk, dict(psk)))
    elif kind == "vxlanipsec-ipv6":
        lab = Lab(tunnel_type="vxlanipsec", tunnel_options=Keys.fresh("aes128gcm16").options(),
                  underlay_ips=UNDERLAY6)
    else:
        lab = Lab(tunnel_type="geneve", underlay_ips=UNDERLAY6)
    with lab:
        if kind == "geneve-psk":
            assert wait_for(lambda: all(status(lab, i).get("ipsec_state") == "established"
                                        for i in (0, 1)), 30), status(lab, 0)
        assert lab.wait_for_ping(30.0)
        assert received(lab.ping(50, 0.01)) == 50
        before = [fast_counters(lab, i) for i in (0, 1)]
        r = iperf3(lab, 0, ("-t", "2"))
        assert "error" not in r and r["end"]["sum_received"]["bytes"] > 0, r
        after = [fast_counters(lab, i) for i in (0, 1)]
        # The sender's VM frames are sealed (or encapsulated) in C, and the receiver's
        # NIC frames opened and delivered there: most of the transfer, both sides.
        assert after[0]["tx_hits"] - before[0]["tx_hits"] > 1000, (before, after)
        assert after[1]["hits"] - before[1]["hits"] > 1000, (before, after)
        # Misses: what Python must see (the VMs' broadcasts and multicasts are upcalls, and
        # each ends its batch in C so that order holds): a small share, however large the
        # batches are on a busy machine.
        hits = after[1]["hits"] - before[1]["hits"]
        assert (after[1]["misses"] - before[1]["misses"]) * 50 < hits, (before, after)
        for i in (0, 1):
            show = lab.appctl(lab.hvs[i], "dpif/show").stdout
            # The NIC's batches are read in its receive ring, in place.
            assert re.search(r"\(system\) fast-rx zero-copy", show), show
            assert re.search(r"\(tap\) fast-tx", show), show
            assert "fast-tx-tunnel" in show, show
