"""Read the namespace's IPv4 routes and addresses from the kernel (pyroute2)."""

from __future__ import annotations

import socket

from espswitch.datapath.tunnel import Route, ip4

RT_TABLE_MAIN = 254
RTN_UNICAST = 1


class KernelRoutes:
    """A netlink socket kept open; `read()` dumps routes and addresses."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()

    def read(self) -> tuple[list[Route], dict[str, list[bytes]]]:
        ipr = self.ipr
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        addresses: dict[str, list[bytes]] = {}
        for a in ipr.get_addr(family=socket.AF_INET):
            name = names.get(a["index"])
            local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if name and local:
                addresses.setdefault(name, []).append(ip4(local))
        routes = []
        for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if r["type"] != RTN_UNICAST:
                continue
            oif = r.get_attr("RTA_OIF")
            name = names.get(oif)
            if name is None:
                continue
            dst = r.get_attr("RTA_DST") or "0.0.0.0"
            gw = r.get_attr("RTA_GATEWAY")
            src = r.get_attr("RTA_PREFSRC")
            routes.append(
                Route(
                    prefix=int.from_bytes(ip4(dst), "big"),
                    plen=r["dst_len"],
                    dev=name,
                    gw=ip4(gw) if gw else None,
                    src=ip4(src) if src else None,
                )
            )
        routes.sort(key=lambda r: (r.prefix, r.plen, r.dev))
        return routes, addresses

    def close(self) -> None:
        self.ipr.close()
