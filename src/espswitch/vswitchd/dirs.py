"""OVS's directory variables, with the defaults of the distribution's Open vSwitch."""

from __future__ import annotations

import os


def rundir() -> str:
    return os.environ.get("OVS_RUNDIR") or "/var/run/openvswitch"


def logdir() -> str:
    return os.environ.get("OVS_LOGDIR") or "/var/log/openvswitch"


def dbdir() -> str:
    d = os.environ.get("OVS_DBDIR")
    if d:
        return d
    sysconf = os.environ.get("OVS_SYSCONFDIR")
    return f"{sysconf}/openvswitch" if sysconf else "/etc/openvswitch"
