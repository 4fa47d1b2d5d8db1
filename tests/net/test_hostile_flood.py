"""A million forged ESP frames at a running tunnel's SPI: espswitchd's memory stays flat
(issue 9, D1: each drop used to leak about 2.4 KB, forever)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from espswitch.benchmarks.flood import forged_frames, write_frames

from .ipsec_helpers import Keys, espswitchd_pid, keyed_lab, mac_of, received, sa_rows, wait_for

pytestmark = [pytest.mark.net, pytest.mark.slow]

FRAMES = 1_000_000
RATE = 30_000  # frames per second: what espswitchd's Python path drops on a loaded machine


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def flood(lab, hv, path: str, count: int, rate: int) -> None:
    subprocess.run(["ip", "netns", "exec", hv.ns, sys.executable, "-m",
                    "espswitch.benchmarks.flood", "send", hv.underlay_dev, path, str(count),
                    str(rate)], check=True, capture_output=True, timeout=600)


def dropped(lab) -> int:
    """Every drop hv2 counted for the forged frames: per SA, and before any SA."""
    sa = sa_rows(lab, 1)["in"]
    n = sa["replayed"] + sa["too_old"] + sa["auth_failed"] + sa["malformed"]
    show = lab.appctl(lab.hvs[1], "dpif/show").stdout
    for cause in ("ipfrag_too_small", "esp_malformed"):
        m = re.search(rf"{cause}=(\d+)", show)
        n += int(m.group(1)) if m else 0
    return n


def test_a_million_forged_frames_leave_rss_flat_and_the_tunnel_working(netlab_ok, tmp_path):
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        hv1, hv2 = lab.hvs
        assert lab.wait_for_ping()
        assert received(lab.ping(100, 0.005)) == 100
        frames = forged_frames(
            dst_mac=bytes.fromhex(mac_of(hv2.ns, "br-phy").replace(":", "")),
            src_mac=bytes.fromhex("02aabbccddee"), src=socket.inet_aton(hv1.underlay_ip),
            dst=socket.inet_aton(hv2.underlay_ip), spi=keys.spi_1to2, esp=keys.esp,
            key=bytes.fromhex(keys.key_1to2), replays_of=100)
        path = str(tmp_path / "frames.bin")
        write_frames(path, frames)
        pid = espswitchd_pid(lab, 1)
        # Warm up: the allocator's arenas and every cache reach their working size.
        flood(lab, hv1, path, 100_000, RATE)
        assert wait_for(lambda: dropped(lab) >= 40_000, 30), dropped(lab)
        before_rss, before_drops = rss_kb(pid), dropped(lab)
        flood(lab, hv1, path, FRAMES, RATE)
        # The daemon counts what the kernel handed it; on a busy machine (CI beside other
        # work) its receive ring overflows when it falls behind, so require a good part of
        # the frames, not all: the old leak was 2.4 KB for each one counted.
        wait_for(lambda: dropped(lab) - before_drops >= FRAMES * 0.9, 30)
        counted = dropped(lab) - before_drops
        grown = rss_kb(pid) - before_rss
        print(f"espswitchd RSS grew {grown} kB over {counted} forged frames counted")
        assert counted >= FRAMES * 0.4, f"only {counted} of {FRAMES} forged frames counted"
        assert grown < 8 * 1024, f"RSS grew {grown} kB over {counted} dropped frames"
        assert espswitchd_pid(lab, 1) == pid and os.path.exists(f"/proc/{pid}")
        assert sa_rows(lab, 1)["in"]["packets"] >= 100  # nothing forged was accepted ...
        assert received(lab.ping(20, 0.01)) == 20  # ... and the tunnel still works
