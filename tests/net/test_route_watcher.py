"""The routes' watcher process: espswitchd learns the kernel's routes and addresses from a
child that decodes the dumps (pyroute2) away from the datapath (datapath/netlink.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .lab import wait_until

pytestmark = pytest.mark.net

DRIVER = r'''
import json, os, select, subprocess, sys, time
from espswitch.datapath.netlink import RouteWatcher

def wait_view(w, pred, timeout=20.0):
    """The first view the watcher reports that satisfies pred, and how long it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        fd = w.fileno()
        if fd >= 0:
            select.select([fd], [], [], 0.2)
        else:
            time.sleep(0.05)
        if w.changed():
            v = w.latest()
            if v is not None and pred(v):
                return v, time.monotonic() - t0
    raise SystemExit("no such view within the deadline")

def ip(*a):
    subprocess.run(["ip", *a], check=True)

out = {}
w = RouteWatcher()
first_pid = w.proc.pid
v, out["first_s"] = wait_view(w, lambda v: "lo" in v[1])
ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
ip("link", "set", "v0", "up")
ip("addr", "add", "192.0.2.9/24", "dev", "v0")
has = lambda v: bytes([192, 0, 2, 9]) in v[1].get("v0", []) and any(
    r.dev == "v0" and r.plen == 24 and r.prefix == 0xC0000200 for r in v[0])
v, out["change_s"] = wait_view(w, has)
# The child ends (killed): the watcher starts another, which reports the view again.
w.proc.kill()
v, out["restart_s"] = wait_view(w, has)
out["starts"] = w.starts
child = w.proc.pid
out["read_now"] = has(w.read())
w.close()
time.sleep(0.2)
out["children_alive"] = [p for p in (first_pid, child) if os.path.exists(f"/proc/{p}")
                         and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
print(json.dumps(out))
'''



def test_the_watcher_reports_changes_comes_back_when_killed_and_stops_with_close(netns):
    r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", DRIVER],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["change_s"] < 10 and out["restart_s"] < 10
    assert out["starts"] == 2
    assert out["read_now"] is True
    assert out["children_alive"] == []


def test_the_watcher_child_ends_when_the_daemon_does(netns):
    """Its stdin's other end closes with the daemon: no child is left behind."""
    code = ("import sys, time\nfrom espswitch.datapath.netlink import RouteWatcher\n"
            "w = RouteWatcher()\nprint(w.proc.pid, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                         stdout=subprocess.PIPE, text=True)
    try:
        child = int(p.stdout.readline())
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
            time.sleep(0.05)
        alive = os.path.exists(f"/proc/{child}")
        if alive:
            with open(f"/proc/{child}/stat") as f:
                alive = f.read().split()[2] != "Z"
        assert not alive
    finally:
        if p.poll() is None:
            p.kill()


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live children of `pid`."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append((int(p), cmd))
    return out


def test_espswitchd_follows_a_new_route_through_its_watcher_and_takes_it_along(lab):
    hv = lab.hypervisor("hv1")
    hv.start()
    pid = hv.pid()
    watchers = [c for c in _children(pid) if "espswitch.datapath.netlink" in c[1]]
    assert len(watchers) == 1, _children(pid)
    hv.sh("ip", "link", "add", "rw0", "type", "veth", "peer", "name", "rw1")
    hv.sh("ip", "link", "set", "rw0", "up")
    hv.sh("ip", "addr", "add", "198.51.100.7/24", "dev", "rw0")
    assert wait_until(lambda: "198.51.100.0/24" in hv.appctl("ovs/route/show").stdout,
                      timeout=15) is not None, hv.appctl("ovs/route/show").stdout
    hv.stop()
    assert wait_until(lambda: not os.path.exists(f"/proc/{watchers[0][0]}"), timeout=15) \
        is not None
