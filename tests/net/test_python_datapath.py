"""The end-to-end ESP, vxlanipsec, IKE and hostile-underlay tests on the pure-Python datapath.

The whole suite runs on the compiled fast path (the default where the module is built).
This runs those end-to-end modules once more with `other_config:fast-path=false` on every
lab hypervisor (labkit's ESPSWITCH_LAB_FAST_PATH), in a child pytest, so that the Python
reference datapath stays a complete switch and not only the fast path's test oracle.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from espswitch.cli.labkit import FAST_PATH_ENV

pytestmark = pytest.mark.net

HERE = Path(__file__).parent
MODULES = ("test_vxlanipsec.py", "test_hostile_underlay.py", "test_ike_tunnel.py")


def test_end_to_end_modules_pass_with_fast_path_false(netlab_ok) -> None:
    env = dict(os.environ, **{FAST_PATH_ENV: "false"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         *(str(HERE / m) for m in MODULES)],
        cwd=HERE.parent.parent, env=env, capture_output=True, text=True, timeout=1200)
    tail = "\n".join(proc.stdout.splitlines()[-30:])
    assert proc.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail and " skipped" not in tail, tail


def test_the_switch_makes_lab_hypervisors_python_only(netlab_ok, monkeypatch) -> None:
    """What the child run relies on: with the variable set, a lab's espswitchd forwards
    and keys on the Python path (dpif/show says so), and traffic flows."""
    from .ipsec_helpers import Keys, keyed_lab, received

    monkeypatch.setenv(FAST_PATH_ENV, "false")
    with keyed_lab(Keys.fresh("aes128gcm16")) as lab:
        assert lab.wait_for_ping()
        assert received(lab.ping(20, 0.01)) == 20
        for hv in lab.hvs:
            show = lab.appctl(hv, "dpif/show").stdout
            assert "fast-path: disabled (off)" in show and "esp_engine=python" in show, show
