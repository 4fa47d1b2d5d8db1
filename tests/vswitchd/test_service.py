"""`espswitch start|stop` user errors: one line, non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess


def _espswitch(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(["espswitch", *args], capture_output=True, text=True, env=e,
                          timeout=60)


def test_start_with_unusable_rundir_is_one_line(tmp_path):
    r = _espswitch("start", env={"OVS_RUNDIR": "/proc/espswitch-test/run",
                                 "OVS_DBDIR": str(tmp_path), "OVS_LOGDIR": str(tmp_path)})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot create directory /proc/espswitch-test/run" in lines[0]
    assert "Traceback" not in r.stderr


def test_start_with_missing_schema_is_one_line(tmp_path):
    r = _espswitch("start", "--schema", str(tmp_path / "nope.ovsschema"),
                   env={"OVS_RUNDIR": str(tmp_path), "OVS_DBDIR": str(tmp_path),
                        "OVS_LOGDIR": str(tmp_path)})
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.ovsschema" in r.stderr
    assert not os.path.exists(tmp_path / "conf.db")


def test_stop_when_nothing_runs(tmp_path):
    r = _espswitch("stop", env={"OVS_RUNDIR": str(tmp_path), "OVS_DBDIR": str(tmp_path),
                                "OVS_LOGDIR": str(tmp_path)})
    assert r.returncode == 0
    assert "nothing was running" in r.stdout


def test_espswitchd_bad_option_is_an_error():
    r = subprocess.run(["espswitchd", "--no-such-option"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_start_refuses_to_run_next_to_ovs_vswitchd(tmp_path):
    # A live process's pid in ovs-vswitchd.pid: ours.
    (tmp_path / "ovs-vswitchd.pid").write_text(f"{os.getpid()}\n")
    r = _espswitch("start", env={"OVS_RUNDIR": str(tmp_path), "OVS_DBDIR": str(tmp_path),
                                 "OVS_LOGDIR": str(tmp_path)})
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "ovs-vswitchd is running" in r.stderr
    assert not os.path.exists(tmp_path / "conf.db")
