"""`espswitch bench e2e --underlay-mtu`: the espswitch lab gets jumbo frames the way an
operator gives them (mtu_request), kernel VXLAN on its devices, and each row says so."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.net


def test_bench_e2e_with_a_jumbo_underlay_runs_both_paths_at_that_mtu(tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    out = tmp_path / "e2e.json"
    p = subprocess.run(["espswitch", "bench", "e2e", "--quick", "--paths",
                        "espswitch-vxlan,kernel-vxlan", "--underlay-mtu", "9000",
                        "--json", str(out), "--png", str(tmp_path / "e2e.png")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["underlay_mtu"] == 9000 and data["targets"] is None
    rows = {r["path"]: r for r in data["results"]}
    for path in ("espswitch-vxlan", "kernel-vxlan"):
        row = rows[path]
        assert "error" not in row, row
        assert row["underlay_mtu"] == 9000
        assert row["vm_mtu"] == 9000 - 50  # IPv4 VXLAN: 20 + 8 + 8 + 14
        assert row["tcp_gbps"] > 0
    assert "underlay MTU 9000" in p.stdout
