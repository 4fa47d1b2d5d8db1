"""Fixtures for end-to-end tests: real namespaces, devices, ovsdb-server and espswitchd."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from .lab import Topology, build_tunnel_lab


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    for tool in ("ip", "ovsdb-server", "ovs-vsctl", "ovs-appctl", "ping"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if shutil.which("espswitch") is None:
        return "needs the espswitch command (pip install -e .)"
    return None


@pytest.fixture(scope="session")
def netlab_ok():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def lab(netlab_ok):
    lab = Topology(tempfile.mkdtemp(prefix="espswitch-net-"))
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def tunnel(netlab_ok):
    """Two hypervisors, a VM on each, VXLAN between them; shared by a module's tests."""
    lab, t = build_tunnel_lab(tempfile.mkdtemp(prefix="espswitch-net-"))
    yield t
    lab.close()


@pytest.fixture
def fresh_tunnel(netlab_ok):
    """The same topology, for a test that tears parts of it down."""
    lab, t = build_tunnel_lab(tempfile.mkdtemp(prefix="espswitch-net-"))
    t["lab"] = lab
    yield t
    lab.close()


@pytest.fixture
def netns():
    """A fresh, uniquely named network namespace (loopback up), removed afterwards: for
    tests that run a driver script inside it with `ip netns exec`."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"espswitch-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
