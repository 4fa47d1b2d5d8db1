"""`espswitch bench` stopped by SIGTERM (or Ctrl-C) removes what it built, as the demo does."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.net


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _remove(names: set[str]) -> None:
    prefix = next(iter(names)).rsplit("-", 1)[0]
    subprocess.run(["pkill", "-f", prefix], check=False)
    for n in names:
        subprocess.run(["ip", "netns", "del", n], capture_output=True, check=False)


def test_bench_e2e_stopped_by_sigterm_leaves_no_namespace_or_daemon(tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    before = _netns()
    made: set[str] = set()
    p = subprocess.Popen(["espswitch", "bench", "e2e", "--quick", "--paths", "espswitch-vxlan",
                          "--json", str(tmp_path / "e2e.json"), "--png",
                          str(tmp_path / "e2e.png")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # Stopped once its two hypervisors and two VMs exist (their switches starting).
        while len(made) < 4 and time.monotonic() < deadline and p.poll() is None:
            made = {n for n in _netns() - before if n.endswith(("-hv1", "-hv2", "-vm1", "-vm2"))}
            time.sleep(0.05)
        assert len(made) == 4, (made, p.poll())
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        if made & _netns():  # what a failing run left: removed all the same
            _remove(made)
    assert p.returncode == 130, out + err
    assert "interrupted; everything it made was removed" in err
    assert "Traceback" not in err
    assert not made & _netns()
    prefix = next(iter(made)).rsplit("-", 1)[0]
    assert not subprocess.run(["pgrep", "-f", prefix], capture_output=True,
                              text=True).stdout.split()
