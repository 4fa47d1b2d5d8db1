"""`espswitch start` / `espswitch stop`: ovsdb-server plus espswitchd, the embedded default.

Both honour OVS_RUNDIR, OVS_DBDIR and OVS_LOGDIR as the Open vSwitch tools do, so several
hypervisors can run side by side, each in its own network namespace.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from espswitch.vswitchd import dirs

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class ServiceError(Exception):
    """A failure to report as one line on stderr, exit code 1."""


def register(subparsers: Any) -> None:
    """Add `start` and `stop` to the `espswitch` subcommand parsers."""
    start = subparsers.add_parser(
        "start",
        help="start ovsdb-server (creating its database if needed) and espswitchd",
        description="Start ovsdb-server on $OVS_DBDIR/conf.db (created from the Open vSwitch "
        "schema when missing) unless one is running under $OVS_RUNDIR, then espswitchd. "
        "Returns once both answer.",
    )
    start.add_argument("--schema", default=SCHEMA, help="the Open_vSwitch schema file")
    start.add_argument(
        "-v",
        "--verbose",
        action="append",
        default=[],
        help="espswitchd log level spec, as for ovs-appctl vlog/set (repeatable)",
    )
    start.set_defaults(func=_run_start, prog=start.prog)
    stop = subparsers.add_parser(
        "stop",
        help="stop espswitchd and ovsdb-server",
        description="Stop espswitchd (its TAP and internal devices go with it) and "
        "ovsdb-server, and remove their pid files and sockets.",
    )
    stop.set_defaults(func=_run_stop, prog=stop.prog)


def _run_start(args) -> int:
    try:
        start(args.schema, args.verbose)
    except ServiceError as e:
        print(f"{args.prog}: {e}", file=sys.stderr)
        return 1
    return 0


def _run_stop(args) -> int:
    try:
        stop()
    except ServiceError as e:
        print(f"{args.prog}: {e}", file=sys.stderr)
        return 1
    return 0


# --- helpers ------------------------------------------------------------------------------
def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServiceError(f"{name} not found: install Open vSwitch (openvswitch-switch)")
    return path


def _run(cmd: list[str], what: str, timeout: float = 20.0) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"{what}: no answer after {timeout:.0f} s") from None
    except OSError as e:
        raise ServiceError(f"{what}: {e.strerror}") from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise ServiceError(f"{what} failed: {msg[-1] if msg else 'exit ' + str(r.returncode)}")
    return r.stdout


def _pid(name: str) -> int | None:
    """The pid in RUNDIR/NAME.pid if that process is alive."""
    try:
        with open(os.path.join(dirs.rundir(), f"{name}.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A zombie or a recycled pid is not our daemon.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return None
    except OSError:
        return None
    return pid


def _answers(name: str) -> bool:
    r = subprocess.run(
        ["ovs-appctl", "-T", "2", "-t", name, "version"], capture_output=True, timeout=10
    )
    return r.returncode == 0


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def _espswitchd_cmd() -> list[str]:
    exe = shutil.which("espswitchd")
    return [exe] if exe else [sys.executable, "-m", "espswitch.vswitchd.main"]


# --- start --------------------------------------------------------------------------------
def start(schema: str = SCHEMA, verbose: list[str] | None = None) -> None:
    rundir, dbdir, logdir = dirs.rundir(), dirs.dbdir(), dirs.logdir()
    for d in (rundir, dbdir, logdir):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise ServiceError(f"cannot create directory {d}: {e.strerror}") from None
    db_sock = os.path.join(rundir, "db.sock")
    if _pid("ovs-vswitchd") is not None:
        raise ServiceError(
            f"ovs-vswitchd is running on {rundir}: espswitchd replaces it; stop it first "
            "(systemctl stop openvswitch-switch, or ovs-appctl -t ovs-vswitchd exit)"
        )
    if _pid("ovsdb-server") is None:
        db = os.path.join(dbdir, "conf.db")
        if not os.path.exists(db):
            if not os.path.exists(schema):
                raise ServiceError(f"schema {schema} not found: install openvswitch-common")
            _run([_tool("ovsdb-tool"), "create", db, schema], "creating the database")
        _run(
            [
                _tool("ovsdb-server"),
                db,
                f"--remote=punix:{db_sock}",
                "--remote=db:Open_vSwitch,Open_vSwitch,manager_options",
                f"--pidfile={os.path.join(rundir, 'ovsdb-server.pid')}",
                f"--log-file={os.path.join(logdir, 'ovsdb-server.log')}",
                "--detach",
                "--no-chdir",
            ],
            "starting ovsdb-server",
        )
        _run([_tool("ovs-vsctl"), "--no-wait", "init"], "initialising the database")
    if _pid("espswitchd") is not None:
        if _answers("espswitchd"):
            print(f"espswitch: already running (OVS_RUNDIR={rundir})")
            return
        raise ServiceError("espswitchd is running but does not answer; run espswitch stop")
    cmd = [
        *_espswitchd_cmd(),
        f"unix:{db_sock}",
        f"--pidfile={os.path.join(rundir, 'espswitchd.pid')}",
        f"--log-file={os.path.join(logdir, 'espswitchd.log')}",
        "--detach",
        "--no-chdir",
    ]
    for v in verbose or []:
        cmd.append(f"--verbose={v}")
    _run(cmd, "starting espswitchd", timeout=START_TIMEOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while not (_answers("espswitchd") and _answers("ovsdb-server")):
        if time.monotonic() > deadline:
            raise ServiceError(
                f"espswitchd does not answer; see {os.path.join(logdir, 'espswitchd.log')}"
            )
        time.sleep(0.1)
    print(f"espswitch: ovsdb-server and espswitchd running (OVS_RUNDIR={rundir})")


# --- stop ---------------------------------------------------------------------------------
def _leftover_devices() -> list[str]:
    """Internal and tap interfaces in the database whose TAP device is still here."""
    try:
        out = _run(
            ["ovs-vsctl", "--timeout=5", "--no-wait", "--format=csv", "--data=bare",
             "--no-headings", "--columns=name,type", "list", "Interface"],
            "listing interfaces",
        )
    except ServiceError:
        return []
    names = []
    for line in out.splitlines():
        name, _, type_ = line.strip().partition(",")
        if type_ in ("internal", "tap"):
            names.append(name)
    return [n for n in names if os.path.exists(f"/sys/class/net/{n}/tun_flags")]


def _moved_devices() -> dict[str, str]:
    """TAP devices that espswitchd saw moved into named namespaces: name -> namespace."""
    try:
        with open(os.path.join(dirs.rundir(), "espswitchd.taps.json")) as f:
            homes = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    if isinstance(homes, dict):
        for dev, path in homes.items():
            if isinstance(path, str) and path.startswith("/run/netns/"):
                out[str(dev)] = os.path.basename(path)
    return out


def _stop_daemon(name: str) -> bool:
    pid = _pid(name)
    if pid is None:
        return False
    subprocess.run(["ovs-appctl", "-T", "5", "-t", name, "exit"], capture_output=True, timeout=15)
    if not _wait_gone(pid, STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, 3.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 3.0)
    return True


def _cleanup_files(name: str) -> None:
    rundir = dirs.rundir()
    for path in [os.path.join(rundir, f"{name}.pid"), *glob.glob(f"{rundir}/{name}.*.ctl")]:
        with contextlib.suppress(OSError):
            os.unlink(path)


def stop() -> None:
    stopped = []
    db_up = _pid("ovsdb-server") is not None
    if _stop_daemon("espswitchd"):
        stopped.append("espswitchd")
    # A crashed espswitchd leaves its persistent devices behind: here, and in the
    # namespaces its VM devices were moved into.
    if db_up:
        for dev in _leftover_devices():
            subprocess.run(["ip", "link", "del", dev], capture_output=True)
    for dev, ns in _moved_devices().items():
        subprocess.run(["ip", "-n", ns, "link", "del", dev], capture_output=True)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(dirs.rundir(), "espswitchd.taps.json"))
    _cleanup_files("espswitchd")
    if _stop_daemon("ovsdb-server"):
        stopped.append("ovsdb-server")
    _cleanup_files("ovsdb-server")
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(dirs.rundir(), "db.sock"))
    if stopped:
        print(f"espswitch: stopped {' and '.join(stopped)}")
    else:
        print("espswitch: nothing was running")
