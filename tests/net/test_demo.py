"""`espswitch demo`, the README's main job: it works and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.net


def _leftovers(prefix: str) -> list[str]:
    """Namespaces, processes, devices and directories named after the demo's lab prefix."""
    found = [f"netns {n}" for n in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        if n.startswith(prefix)]
    found += [f"process {p}" for p in subprocess.run(
        ["pgrep", "-f", prefix], capture_output=True, text=True).stdout.split()]
    found += [f"device {d}" for d in os.listdir("/sys/class/net") if d.startswith(prefix)]
    found += [f"dir {d}" for d in os.listdir("/tmp") if d.startswith(prefix)]
    return found


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.mark.parametrize("args", [[], ["--esp", "chacha20poly1305-esn", "--mode", "tunnel",
                                       "--udp-encap"]])
def test_demo_pings_across_an_encrypted_underlay_and_cleans_up(root: None,
                                                                args: list[str]) -> None:
    r = subprocess.run(["espswitch", "demo", *args], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0% packet loss" in r.stdout
    assert "plaintext VXLAN: 0" in r.stdout
    assert "'secret!' visible: no" in r.stdout
    assert "ESP packets: 0," not in r.stdout or "UDP/4500: 0" not in r.stdout
    assert "esp_key" not in r.stdout
    match = re.search(r"namespaces (es[0-9a-f]+)-hv1", r.stdout)
    assert match, r.stdout
    assert _leftovers(match.group(1)) == []


def test_demo_with_an_unknown_transform_is_one_line_exit_2(root: None) -> None:
    r = subprocess.run(["espswitch", "demo", "--esp", "rot13"], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "rot13" in r.stderr
