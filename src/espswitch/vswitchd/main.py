"""`espswitchd [DATABASE]`: the userspace datapath daemon, as ovs-vswitchd is for OVS."""

from __future__ import annotations

import argparse
import os
import sys

import ovs.daemon
import ovs.dirs
import ovs.fatal_signal
import ovs.unixctl.server
import ovs.util
import ovs.vlog

from espswitch import __version__
from espswitch.datapath.devices import LinuxDevices
from espswitch.datapath.netlink import RouteWatcher
from espswitch.vswitchd import dirs, redact

# Every Vlog module must exist before Vlog.init(): import them all first.
from espswitch.vswitchd.daemon import RateLimit, Switchd, vlog

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def _set_dirs() -> None:
    ovs.dirs.RUNDIR = dirs.rundir()
    ovs.dirs.LOGDIR = dirs.logdir()
    ovs.dirs.DBDIR = dirs.dbdir()
    ovs.util.PROGRAM_NAME = "espswitchd"


def main(argv: list[str] | None = None) -> int:
    _set_dirs()
    parser = argparse.ArgumentParser(
        prog="espswitchd", description="espswitch userspace datapath daemon"
    )
    parser.add_argument(
        "database",
        nargs="?",
        default=None,
        help="OVSDB remote (default unix:$OVS_RUNDIR/db.sock)",
    )
    parser.add_argument("--schema", default=SCHEMA, help="Open_vSwitch schema file")
    parser.add_argument("--unixctl", default=None, help="control socket path")
    parser.add_argument("--version", action="version", version=f"espswitchd {__version__}")
    ovs.vlog.add_args(parser)
    ovs.daemon.add_args(parser)
    args = parser.parse_args(argv)
    redact.install()  # before anything is logged
    ovs.vlog.handle_args(args)
    ovs.daemon.handle_args(args)
    remote = args.database or f"unix:{ovs.dirs.RUNDIR}/db.sock"

    ovs.daemon.daemonize_start()
    error, server = ovs.unixctl.server.UnixctlServer.create(args.unixctl, version=__version__)
    if error:
        ovs.util.ovs_fatal(error, "could not create unixctl server", vlog=None)
    try:
        devices = LinuxDevices(state_path=os.path.join(ovs.dirs.RUNDIR, "espswitchd.taps.json"))
        # (A watcher that keeps ending would say so every second.)
        routes = RouteWatcher(log=RateLimit(vlog.warn))
        sw = Switchd(remote, args.schema, server, routes=routes, devices=devices)
    except Exception as e:
        print(f"espswitchd: {e}", file=sys.stderr)
        return 1
    ovs.fatal_signal.add_hook(lambda: sw.dp.close(), None, True)
    ovs.daemon.daemonize_complete()
    vlog.info(f"espswitchd {__version__} starting, database {remote}")
    profile = os.environ.get("ESPSWITCHD_PROFILE")
    try:
        if profile:  # a developer's aid: cProfile stats written at exit
            import cProfile

            cProfile.runctx("sw.run_forever()", globals(), {"sw": sw}, profile)
        else:
            sw.run_forever()
    finally:
        vlog.info("exiting")
        sw.close()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
