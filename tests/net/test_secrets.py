"""Manually configured keys never leave the `options` column they were written to.

With every log module at debug level, through traffic, a bad key, a re-key and a restart,
the keys (or any 16-hex-digit piece of them) must not show in espswitchd's log, in any
column espswitchd writes, in the output of any `ovs-appctl` command, or in the files
espswitchd keeps.
"""

from __future__ import annotations

import glob
import os
import signal
import time

import pytest

from espswitch.cli.lab import Lab

from .ipsec_helpers import (
    Keys,
    espswitchd_pid,
    keyed_lab,
    received,
    rekey,
    wait_for,
)

pytestmark = pytest.mark.net

APPCTL = (["ipsec/show"], ["ipsec/show", "--json"], ["dpif/show"], ["fdb/show", "br-int"],
          ["tnl/neigh/show"], ["ovs/route/show"], ["ike/show"], ["vlog/list"],
          ["dpif/iface-show", "tun0"])


def pieces(key_hex: str) -> set[str]:
    """Every 16-hex-digit window of the key, both cases: a leak of part of it counts."""
    return {key_hex[i:i + 16].lower() for i in range(0, len(key_hex) - 15, 4)} | \
        {key_hex[i:i + 16].upper() for i in range(0, len(key_hex) - 15, 4)}


def everything_espswitchd_shows(lab) -> dict[str, str]:
    out = {}
    for i, hv in enumerate(lab.hvs):
        for path in glob.glob(os.path.join(hv.dir, "*")):
            if path.endswith((".log", ".seq", ".json")):
                with open(path, errors="replace") as f:
                    out[f"hv{i} {os.path.basename(path)}"] = f.read()
        for args in APPCTL:
            r = lab.appctl(hv, *args, check=False)
            out[f"hv{i} appctl {' '.join(args)}"] = r.stdout + r.stderr
        for col in ("error", "status", "statistics", "link_state", "mac_in_use", "ofport"):
            r = lab.vsctl(hv, "--if-exists", "get", "interface", "tun0", col, check=False)
            out[f"hv{i} tun0 {col}"] = r.stdout + r.stderr
    return out


@pytest.mark.parametrize("esp", ["aes128gcm16", "aes256-sha256"])
def test_keys_never_show_in_logs_status_appctl_or_files(netlab_ok, esp):
    keys = Keys.fresh(esp)
    fresh = Keys.fresh(esp, spi_1to2=0x3001, spi_2to1=0x4001)
    secret = set().union(*(pieces(k) for k in (keys.key_1to2, keys.key_2to1,
                                               fresh.key_1to2, fresh.key_2to1)))
    with keyed_lab(keys) as lab:
        hv1 = lab.hvs[0]
        for hv in lab.hvs:
            lab.appctl(hv, "vlog/set", "dbg")
        assert lab.wait_for_ping()
        assert received(lab.ping(20, 0.01)) == 20
        # A key of the wrong length: the error names the option, never the value.
        lab.vsctl(hv1, "set", "interface", "tun0", f"options:esp_key_out={keys.key_1to2}ab")
        err = lab.vsctl(hv1, "get", "interface", "tun0", "error").stdout
        assert "esp_key_out" in err, err
        # Re-keyed in place, then the daemon killed and started again.
        rekey(lab, fresh)
        assert wait_for(lambda: received(lab.ping(1, 0.1)) == 1, 10)
        time.sleep(1.0)
        os.kill(espswitchd_pid(lab, 0), signal.SIGKILL)
        time.sleep(0.5)
        hv1.start()
        lab.appctl(hv1, "vlog/set", "dbg")
        assert wait_for(lambda: received(lab.ping(1, 0.1)) == 1, 10)
        shown = everything_espswitchd_shows(lab)
        assert any(name.endswith("espswitchd.log") for name in shown), sorted(shown)
        assert sum("dbg" in v.lower() or "DBG" in v for v in shown.values()) > 0
        leaks = {name: sorted(p for p in secret if p in text)[:2]
                 for name, text in shown.items() if any(p in text for p in secret)}
        assert leaks == {}, leaks


def test_pre_shared_key_never_shows_even_at_debug_level(netlab_ok):
    first, second = ("psk-" + os.urandom(12).hex() for _ in range(2))
    lab = Lab(tunnel_type="vxlanipsec", tunnel_options=({"psk": first}, {"psk": first}))
    with lab:
        for hv in lab.hvs:
            lab.appctl(hv, "vlog/set", "dbg")
        # A new PSK at debug level: the database update that carries it reaches espswitchd.
        for hv in lab.hvs:
            lab.vsctl(hv, "set", "interface", "tun0", f"options:psk={second}")
        assert wait_for(lambda: received(lab.ping(1, 0.1)) == 1, 20)
        shown = everything_espswitchd_shows(lab)
        assert sum("jsonrpc" in v for v in shown.values()) > 0  # debug logs were written
        leaks = [name for name, text in shown.items()
                 for psk in (first, second) if psk in text or psk[4:20] in text]
        assert leaks == [], leaks
