"""`espswitch bench e2e`'s pure parts: CPU accounting, ratios, targets, table (no root)."""

from __future__ import annotations

import os
import subprocess

import pytest

from espswitch.benchmarks import e2e


def _row(path: str, gbps: float | None, rtt: float | None, **extra: object) -> dict:
    return {"path": path, "tcp_gbps": gbps, "rtt_ms_avg": rtt, "loadavg_1m": 1.5, **extra}


def test_proc_stat_cpu_counts_fields_after_the_last_parenthesis() -> None:
    # comm may hold spaces and ')': utime (14) = 250 and stime (15) = 50 ticks.
    stat = ("4242 (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 "
            "12345 1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0")
    assert e2e.proc_stat_cpu_seconds(stat, 100) == pytest.approx(3.0)


def test_cpu_seconds_of_this_process_is_what_proc_says() -> None:
    with open(f"/proc/{os.getpid()}/stat") as f:
        expected = e2e.proc_stat_cpu_seconds(f.read(), os.sysconf("SC_CLK_TCK"))
    assert e2e.cpu_seconds([os.getpid()]) >= expected > 0


def test_cpu_seconds_of_a_gone_process_is_a_bench_error() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(e2e.BenchError):
        e2e.cpu_seconds([p.pid])


def test_cpu_cost_is_microseconds_per_1448_bytes_in_total_and_per_side() -> None:
    cost = e2e.cpu_cost({"sender": 0.3, "receiver": 0.1}, 1448 * 100_000)
    assert cost["cpu_us_per_seg"] == pytest.approx(4.0)
    assert cost["cpu_us_per_seg_sender"] == pytest.approx(3.0)
    assert cost["cpu_us_per_seg_receiver"] == pytest.approx(1.0)
    assert e2e.cpu_cost({"sender": 0.3}, 0) == {"cpu_us_per_seg": None,
                                                 "cpu_us_per_seg_sender": None}


def test_ratios_and_targets_of_one_run() -> None:
    results = [_row(e2e.OURS, 3.0, 0.15), _row(e2e.PYTHON_PATH, 0.5, 0.9),
               _row(e2e.OURS_V6, 2.7, 0.16), _row(e2e.OURS_GENEVE, 2.4, 0.16),
               _row(e2e.OVS, 1.0, 0.5),
               _row(e2e.KERNEL, 12.0, 0.08), _row(e2e.BASELINE, 0.25, 0.6)]
    r = e2e.ratios(results)
    assert r[e2e.V6_RATIO] == pytest.approx(0.9)
    assert r[e2e.GENEVE_RATIO] == pytest.approx(0.8)
    assert r["vxlanipsec_vs_libipsec"] == pytest.approx(12.0)
    assert r["vxlanipsec_vs_ovs_userspace_vxlan"] == pytest.approx(3.0)
    assert r["vxlanipsec_vs_kernel_vxlan"] == pytest.approx(0.25)
    assert r["vxlanipsec_vs_python_path"] == pytest.approx(6.0)
    assert r[e2e.RTT_DELTA] == pytest.approx(0.07)
    assert e2e.targets(r) == {"vxlanipsec_vs_libipsec": True,
                              "vxlanipsec_vs_ovs_userspace_vxlan": True,
                              "vxlanipsec_vs_kernel_vxlan": True, e2e.RTT_DELTA: True,
                              e2e.V6_RATIO: True, e2e.GENEVE_RATIO: False}
    assert "NOT met" in e2e.summary(r).splitlines()[-1]
    assert "NOT met" not in "".join(e2e.summary(r).splitlines()[:-1])
    assert r[e2e.RTT_MEDIAN_DELTA] is None  # no medians in these rows: no line for it
    assert "median" not in e2e.summary(r)
    for row, median in zip(results, (0.12, 0.5, 0.13, 0.13, 0.4, 0.03, 0.5), strict=True):
        row["rtt_ms_median"] = median
    r = e2e.ratios(results)
    assert r[e2e.RTT_MEDIAN_DELTA] == pytest.approx(0.09)
    assert "ping RTT median" in e2e.summary(r) and "+0.090 ms" in e2e.summary(r)


def test_a_failed_or_missing_path_gives_no_ratio_and_no_verdict() -> None:
    results = [_row(e2e.OURS, 0.4, 0.7), _row(e2e.OVS, None, None, error="boom"),
               _row(e2e.KERNEL, 12.0, 0.08)]
    r = e2e.ratios(results)
    assert r["vxlanipsec_vs_libipsec"] is None
    assert r["vxlanipsec_vs_ovs_userspace_vxlan"] is None
    t = e2e.targets(r)
    assert t["vxlanipsec_vs_kernel_vxlan"] is False and t[e2e.RTT_DELTA] is False
    assert t["vxlanipsec_vs_libipsec"] is None and t[e2e.V6_RATIO] is None
    text = e2e.table(results)
    assert "FAILED: boom" in text and e2e.OVS in text


def test_table_shows_switch_cpu_per_side_and_the_median_rtt() -> None:
    row = _row(e2e.OVS, 1.0, 0.5, rtt_ms_median=0.25, cpu_us_per_seg=4.5,
               cpu_us_per_seg_sender=2.25, cpu_us_per_seg_receiver=2.25)
    line = e2e.table([row, _row(e2e.BASELINE, 0.25, 0.6)]).splitlines()[2]
    assert line.split()[1:] == ["1.000", "0.500", "0.250", "4.00x", "4.50", "2.25", "2.25",
                                "1.50"]


def test_default_paths_in_order_and_unknown_path_is_refused() -> None:
    assert e2e.PATHS == ("espswitch-vxlanipsec-aes128gcm16", "espswitch-vxlanipsec-python",
                         "espswitch-vxlanipsec-ipv6-underlay", "espswitch-geneve-ipsec-psk",
                         "espswitch-vxlan",
                         "ovs-userspace-vxlan", "kernel-vxlan", "strongswan-libipsec")
    assert set(e2e.BENCHES) == set(e2e.PATHS)
    r = subprocess.run(["espswitch", "bench", "e2e", "--paths", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "ovs-userspace-vxlan" in r.stderr


def test_underlay_mtu_out_of_range_or_for_a_path_without_it_is_refused() -> None:
    r = subprocess.run(["espswitch", "bench", "e2e", "--underlay-mtu", "100"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "from 1280 to 65535" in r.stderr
    r = subprocess.run(["espswitch", "bench", "e2e", "--underlay-mtu", "9000", "--paths",
                        "kernel-vxlan,strongswan-libipsec"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not strongswan-libipsec" in r.stderr
    assert "Traceback" not in r.stderr
