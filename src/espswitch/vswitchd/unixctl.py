"""Registering `ovs-appctl` commands so that a failing handler still answers."""

from __future__ import annotations

from collections.abc import Callable

import ovs.unixctl
import ovs.vlog

vlog = ovs.vlog.Vlog("appctl")


def _line(body: str | None) -> str:
    # As OVS's C unixctl does: a reply that does not end its last line gets a newline, so
    # ovs-appctl's own "server returned an error" starts on a line of its own.
    if body and not body.endswith("\n"):
        return body + "\n"
    return body or ""


class _Conn:
    """A unixctl connection whose replies end with a newline."""

    __slots__ = ("_conn",)

    def __init__(self, conn) -> None:
        self._conn = conn

    def reply(self, body: str | None) -> None:
        self._conn.reply(_line(body))

    def reply_error(self, body: str | None) -> None:
        self._conn.reply_error(_line(body))

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def guarded(cb: Callable) -> Callable:
    """Reply with an error instead of leaving ovs-appctl waiting if a handler fails."""

    def handler(conn, argv, aux) -> None:
        conn = _Conn(conn)
        try:
            cb(conn, argv, aux)
        except Exception as e:
            vlog.exception(f"appctl handler {cb.__name__} failed")
            conn.reply_error(f"internal error: {e}")

    return handler


def register(name: str, usage: str, lo: int, hi: int, cb: Callable, aux: object = None) -> None:
    """`ovs.unixctl.command_register` with the handler guarded."""
    ovs.unixctl.command_register(name, usage, lo, hi, guarded(cb), aux)
