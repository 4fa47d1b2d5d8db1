"""Read the namespace's IPv4 and IPv6 routes and addresses from the kernel (pyroute2)."""

from __future__ import annotations

import socket

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


class KernelRoutes:
    """A netlink socket kept open; `read()` dumps routes and addresses (pyroute2).

    A second socket joins the kernel's link, address and route groups: `changed()` says
    whether the kernel announced anything since the last call, so that the daemon reads
    the tables again when they change rather than every second (a read costs about 10 ms
    of Python, a pause of every packet behind it). The announcements themselves are not
    parsed: any of them means read everything again."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.notify = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            NETLINK_ROUTE)
        self.notify.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
                          | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE))

    def fileno(self) -> int:
        """The announcements' socket: readable when the kernel announced a change."""
        return self.notify.fileno()

    def changed(self) -> bool:
        """Drain the announcements; whether there were any (or some were lost: ENOBUFS)."""
        seen = False
        while True:
            try:
                if not self.notify.recv(65536):
                    return seen
            except (BlockingIOError, InterruptedError):
                return seen
            except OSError:  # the kernel dropped announcements: read everything again
                return True
            seen = True

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
        self.notify.close()
        self.ipr.close()
