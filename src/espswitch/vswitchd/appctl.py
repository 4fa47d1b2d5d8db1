"""`ovs-appctl -t espswitchd` commands: validate, change, then reply."""

from __future__ import annotations

from typing import TYPE_CHECKING

from espswitch.datapath.ports import format_mac
from espswitch.datapath.tunnel import ip_addr
from espswitch.vswitchd import ipsec_appctl, unixctl

if TYPE_CHECKING:
    from espswitch.vswitchd.daemon import Switchd


def register(sw: Switchd) -> None:
    reg = unixctl.register
    dp = sw.dp

    def dpif_show(conn, argv, aux):
        conn.reply(dp.show())

    def fdb_show(conn, argv, aux):
        b = dp.bridges.get(argv[0])
        if b is None:
            conn.reply_error(f"no such bridge: {argv[0]}")
            return
        lines = [" port  VLAN  MAC                Age"]
        for port, vlan, mac, age in b.fdb(dp.now):
            pname = "LOCAL" if port.ofport == 65534 else str(port.ofport)
            lines.append(f"{pname:>5}  {vlan:>4}  {mac}  {age:>3}")
        conn.reply("\n".join(lines) + "\n")

    def fdb_flush(conn, argv, aux):
        bridges = [dp.bridges.get(argv[0])] if argv else list(dp.bridges.values())
        if None in bridges:
            conn.reply_error(f"no such bridge: {argv[0]}")
            return
        for b in bridges:
            b.macs.clear()
        dp.fast_changed()  # the fast path forgets what it installed from them
        conn.reply("table successfully flushed\n")

    def neigh_show(conn, argv, aux):
        conn.reply(dp.neigh.show(dp.now))

    def neigh_set(conn, argv, aux):
        bridge, ip, mac = argv
        if bridge not in dp.bridges:
            conn.reply_error(f"no such bridge: {bridge}")
            return
        try:
            ipb = ip_addr(ip)
        except ValueError:
            conn.reply_error(f"bad IP address: {ip} (IPv4 or IPv6)")
            return
        try:
            macb = bytes.fromhex(mac.replace(":", ""))
            if len(macb) != 6:
                raise ValueError
        except ValueError:
            conn.reply_error(f"bad MAC address: {mac}")
            return
        dp.neigh.learn(bridge, ipb, macb, dp.now)
        dp.tunnels.learned(bridge, ipb)
        dp.run(dp.now)
        conn.reply("OK\n")

    def neigh_flush(conn, argv, aux):
        dp.neigh.flush()
        conn.reply("OK\n")

    def route_show(conn, argv, aux):
        conn.reply(dp.routes.show())

    def route_add(conn, argv, aux):
        prefix, dev = argv[0], argv[1]
        gw = argv[2] if len(argv) > 2 else None
        try:
            dp.routes.add(prefix, dev, gw)
        except ValueError as e:
            conn.reply_error(f"bad route: {e}")
            return
        dp.run(dp.now)
        conn.reply("OK\n")

    def route_del(conn, argv, aux):
        try:
            removed = dp.routes.delete(argv[0])
        except ValueError as e:
            conn.reply_error(f"bad prefix: {e}")
            return
        if not removed:
            conn.reply_error(f"no user route for {argv[0]}")
            return
        dp.run(dp.now)
        conn.reply("OK\n")

    def exit_(conn, argv, aux):
        if argv and argv[0] != "--cleanup":
            conn.reply_error(f"exit: unknown option {argv[0]} (usage: exit [--cleanup])")
            return
        sw.exiting = True
        conn.reply(None)

    def iface_show(conn, argv, aux):
        p = dp.ports.get(argv[0])
        if p is None:
            conn.reply_error(f"no such interface: {argv[0]}")
            return
        mac = format_mac(p.mac) if hasattr(p, "mac") else "-"
        conn.reply(f"{p.name}: {p.describe()} mac={mac}\n{p.statistics()}\n{p.status()}\n")

    reg("dpif/show", "", 0, 0, dpif_show, None)
    reg("fdb/show", "BRIDGE", 1, 1, fdb_show, None)
    reg("fdb/flush", "[BRIDGE]", 0, 1, fdb_flush, None)
    for area in ("tnl/neigh", "tnl/arp"):
        reg(f"{area}/show", "", 0, 0, neigh_show, None)
        reg(f"{area}/set", "BRIDGE IP MAC", 3, 3, neigh_set, None)
        reg(f"{area}/flush", "", 0, 0, neigh_flush, None)
    reg("ovs/route/show", "", 0, 0, route_show, None)
    reg("ovs/route/add", "IP/PLEN BRIDGE [GW]", 2, 3, route_add, None)
    reg("ovs/route/del", "IP/PLEN", 1, 1, route_del, None)
    reg("dpif/iface-show", "IFACE", 1, 1, iface_show, None)
    # OVS's `exit --cleanup` is accepted; espswitchd always removes its devices on exit.
    reg("exit", "[--cleanup]", 0, 1, exit_, None)
    ipsec_appctl.register(sw)
