"""Read the namespace's IPv4 and IPv6 routes and addresses from the kernel (pyroute2).

`KernelRoutes.read()` dumps them in this process. `RouteWatcher` has a child process
(`python3 -m espswitch.datapath.netlink`, in the same network namespace) dump them
whenever the kernel announces a change, and every `REFRESH` seconds, and write each new
view as one line of JSON: decoding a dump with pyroute2 is milliseconds of Python (7 to 10
ms for a handful of routes on this project's machine, far more with many), and in the
daemon's process every packet would wait behind it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TextIO

from espswitch.datapath.tunnel import Route, ip_addr

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
IFA_F_DADFAILED = 0x08
# rtnetlink multicast groups (linux/rtnetlink.h): links, addresses and routes, both families.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
NETLINK_ROUTE = 0
REFRESH = 30.0  # seconds: the kernel's tables are read again when announced, and this often
SETTLE = 0.02  # seconds: announcements come in bursts; read once they stop this long
RESPAWN_GAP = 1.0  # seconds: a watcher that ended is started again at most this often

View = tuple[list[Route], dict[str, list[bytes]]]
"""The kernel's routes (main table, unicast) and every device's addresses."""


class KernelRoutes:
    """A netlink socket kept open; `read()` dumps routes and addresses (pyroute2).

    With `notify`, a second socket joins the kernel's link, address and route groups:
    `changed()` says whether the kernel announced anything since the last call, so that
    the tables are read again when they change (`watch`). The announcements themselves
    are not parsed: any of them means read everything again."""

    def __init__(self, notify: bool = True) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.notify: socket.socket | None = None
        if notify:
            self.notify = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                NETLINK_ROUTE)
            self.notify.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
                              | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE))

    def changed(self) -> bool:
        """Drain the announcements; whether there were any (or some were lost: ENOBUFS)."""
        seen = False
        while self.notify is not None:
            try:
                if not self.notify.recv(65536):
                    return seen
            except (BlockingIOError, InterruptedError):
                return seen
            except OSError:  # the kernel dropped announcements: read everything again
                return True
            seen = True
        return seen

    def read(self) -> tuple[list[Route], dict[str, list[bytes]]]:
        ipr = self.ipr
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        addresses: dict[str, list[bytes]] = {}
        routes = []
        for family, default in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            for a in ipr.get_addr(family=family):
                name = names.get(a["index"])
                local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                flags = a.get_attr("IFA_FLAGS") or a["flags"]
                if family == socket.AF_INET6 and flags & IFA_F_DADFAILED:
                    continue  # another host has it: not ours to use
                if name and local:
                    addresses.setdefault(name, []).append(ip_addr(local))
            for r in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                if r["type"] != RTN_UNICAST:
                    continue
                oif = r.get_attr("RTA_OIF")
                name = names.get(oif)
                if name is None:
                    continue
                dst = r.get_attr("RTA_DST") or default
                gw = r.get_attr("RTA_GATEWAY")
                src = r.get_attr("RTA_PREFSRC")
                routes.append(
                    Route(
                        prefix=int.from_bytes(ip_addr(dst), "big"),
                        plen=r["dst_len"],
                        dev=name,
                        gw=ip_addr(gw) if gw else None,
                        src=ip_addr(src) if src else None,
                        v6=family == socket.AF_INET6,
                    )
                )
        routes.sort(key=lambda r: (r.v6, r.prefix, r.plen, r.dev))
        return routes, addresses

    def close(self) -> None:
        if self.notify is not None:
            self.notify.close()
        self.ipr.close()


def encode_view(view: View) -> str:
    """One line of JSON for a view (addresses in hex)."""
    routes, addresses = view
    return json.dumps({
        "routes": [[r.prefix, r.plen, r.dev, r.gw.hex() if r.gw else None,
                    r.src.hex() if r.src else None, r.v6] for r in routes],
        "addresses": {dev: [a.hex() for a in addrs] for dev, addrs in addresses.items()},
    }, separators=(",", ":"))


def decode_view(line: str) -> View:
    """The view `encode_view` wrote; ValueError (or KeyError, TypeError) if it is not one."""
    d = json.loads(line)
    if "error" in d:
        raise OSError(str(d["error"]))
    routes = [Route(prefix=int(p), plen=int(plen), dev=str(dev),
                    gw=bytes.fromhex(gw) if gw else None,
                    src=bytes.fromhex(src) if src else None, v6=bool(v6))
              for p, plen, dev, gw, src, v6 in d["routes"]]
    addresses = {str(dev): [bytes.fromhex(a) for a in addrs]
                 for dev, addrs in d["addresses"].items()}
    return routes, addresses


def watch(out: TextIO, stop_fd: int, refresh: float = REFRESH, settle: float = SETTLE) -> None:
    """The watcher's loop: a view on `out` at once, then again whenever the kernel announces
    a change (once the announcements have settled) or `refresh` seconds passed and the view
    is not the one written last. Returns when `stop_fd` is readable (its end closed: the
    daemon is gone) or `out` is closed."""
    kr = KernelRoutes()
    last = None
    due = 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= due:
                try:
                    line = encode_view(kr.read())
                except Exception as e:  # the daemon logs it
                    line = json.dumps({"error": f"{type(e).__name__}: {e}"})
                due = time.monotonic() + refresh
                if line != last:
                    try:
                        out.write(line + "\n")
                        out.flush()
                    except (BrokenPipeError, ValueError):
                        return
                    last = line
            ready = select.select([kr.notify, stop_fd], [], [],
                                  max(0.0, due - time.monotonic()))[0]
            if stop_fd in ready:
                return
            if kr.notify in ready and kr.changed():
                # Announcements come in bursts (an address brings its routes): one read
                # once they stop for a moment.
                while ready := select.select([kr.notify, stop_fd], [], [], settle)[0]:
                    if stop_fd in ready:
                        return
                    kr.changed()
                due = 0.0
    finally:
        kr.close()


class RouteWatcher:
    """The daemon's view of the kernel's routes: `read()` dumps them now, in this process
    (at start and after a configuration change); the child process `watch`es for changes,
    and `fileno()` is readable when it wrote something: `changed()` takes it, and says
    whether a new view is there for `latest()`. A child that ended is started again (at
    most every RESPAWN_GAP seconds, from `changed()`)."""

    def __init__(self, refresh: float = REFRESH,
                 log: Callable[[str], None] | None = None) -> None:
        self.local = KernelRoutes(notify=False)
        self.refresh = refresh
        self.log = log or (lambda msg: None)
        self.proc: subprocess.Popen | None = None
        self._buf = b""
        self._line: bytes | None = None
        self._started = 0.0
        #: times the child was started (the first included), and how the last one ended
        self.starts = 0
        self.returncode: int | None = None
        self._spawn()

    def _spawn(self) -> None:
        self._started = time.monotonic()
        self.starts += 1
        self._buf = b""
        # stdin is never written: its end closing (the daemon gone) stops the child. Its
        # stderr is not the daemon's, which may be the pipe of whoever started the daemon
        # and waits for it to close (`espswitch start`).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "espswitch.datapath.netlink", "--refresh",
             str(self.refresh)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True)
        os.set_blocking(self.proc.stdout.fileno(), False)

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            f.close()
        if proc.poll() is None:
            proc.terminate()
        try:
            self.returncode = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.returncode = proc.wait()

    def fileno(self) -> int:
        """Readable when the child wrote (or ended); -1 while none runs."""
        return self.proc.stdout.fileno() if self.proc is not None else -1

    def read(self) -> View:
        """Dump the routes and addresses now, in this process."""
        return self.local.read()

    def changed(self) -> bool:
        """Take what the child wrote; whether a new view is waiting for `latest()`."""
        if self.proc is None:
            if time.monotonic() >= self._started + RESPAWN_GAP:
                self._spawn()
            return self._line is not None
        while True:
            try:
                data = os.read(self.proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not data:  # the child ended: started again, at once or after the gap
                self._reap()
                self.log(f"the routes' watcher process ended (exit status "
                         f"{self.returncode}); starting it again")
                if time.monotonic() >= self._started + RESPAWN_GAP:
                    self._spawn()
                break
            self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if lines:
            self._line = lines[-1]
        return self._line is not None

    def latest(self) -> View | None:
        """The newest view the child wrote, once (None if none is new); OSError if its
        last read failed, ValueError if it wrote something that is not a view."""
        line, self._line = self._line, None
        if line is None:
            return None
        return decode_view(line.decode())

    def close(self) -> None:
        """Stop the child."""
        self._reap()
        self.local.close()


def main(argv: list[str] | None = None) -> int:
    """The watcher child: views on stdout until stdin's other end closes."""
    import argparse

    ap = argparse.ArgumentParser(description="write the kernel's routes and addresses as "
                                 "JSON lines whenever they change")
    ap.add_argument("--refresh", type=float, default=REFRESH)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        watch(sys.stdout, sys.stdin.fileno(), refresh=args.refresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
