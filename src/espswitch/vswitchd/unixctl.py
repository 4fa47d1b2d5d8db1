"""Registering `ovs-appctl` commands so that a failing handler still answers."""

from __future__ import annotations

from collections.abc import Callable

import ovs.unixctl
import ovs.vlog

vlog = ovs.vlog.Vlog("appctl")


def guarded(cb: Callable) -> Callable:
    """Reply with an error instead of leaving ovs-appctl waiting if a handler fails."""

    def handler(conn, argv, aux) -> None:
        try:
            cb(conn, argv, aux)
        except Exception as e:
            vlog.exception(f"appctl handler {cb.__name__} failed")
            conn.reply_error(f"internal error: {e}")

    return handler


def register(name: str, usage: str, lo: int, hi: int, cb: Callable, aux: object = None) -> None:
    """`ovs.unixctl.command_register` with the handler guarded."""
    ovs.unixctl.command_register(name, usage, lo, hi, guarded(cb), aux)
