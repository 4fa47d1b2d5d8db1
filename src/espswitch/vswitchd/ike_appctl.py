"""The IKE commands of espswitchd's ovs-appctl: ike/show [--json] [IFACE] (peers, SAs and
message counters; never a key or a PSK) and ike/rekey IFACE [child|ike]."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from espswitch.ike import IkeCore
from espswitch.vswitchd import unixctl
from espswitch.vswitchd.ike_peers import PeerSync, child_in_use, command

if TYPE_CHECKING:
    from espswitch.datapath import Datapath

__all__ = ["IkeAppctl"]


class IkeAppctl:
    """ike/ commands over the core and the peers of `sync`; `flush(now)` sends what a
    command made the core produce."""

    def __init__(self, dp: Datapath, core: IkeCore, sync: PeerSync,
                 flush: Callable[[float], None]) -> None:
        self.dp, self.core, self.sync, self.flush = dp, core, sync, flush

    def show(self, name: str | None = None) -> list[dict[str, object]]:
        """The IKE peers and SAs for ike/show: no keys, no PSK."""
        out = []
        for pname in sorted(self.sync.peers):
            if name is not None and pname != name:
                continue
            p = self.sync.peers[pname]
            sas = []
            for s in self.core.ike_sas(pname):
                sas.append({
                    "ike_id": s.ike_id, "state": s.state,
                    "role": "initiator" if s.initiator else "responder",
                    "spi_i": s.spi_i.hex(), "spi_r": s.spi_r.hex(),
                    "peer_id": s.remote_id, "fragmentation": s.fragmentation,
                    "children": [{"name": c.name, "state": c.state,
                                  "spi_in": f"0x{c.spi_in:08x}", "spi_out": f"0x{c.spi_out:08x}",
                                  "esp": c.transform, "mode": c.mode,
                                  "local_ts": c.local_ts, "remote_ts": c.remote_ts}
                                 for c in s.children],
                })
            out.append({
                "interface": pname, "local": p.cfg.local_addr, "remote": p.cfg.remote_addr,
                "followers": sorted(f.name for f in p.port.followers.values()),
                "local_id": str(p.cfg.local_id),
                "remote_id": str(p.cfg.remote_id) if p.cfg.remote_id else "any",
                "auth": "certificates" if p.cfg.credentials.uses_certs else "psk",
                "ike": p.cfg.ike_proposals, "esp": p.port.ike.esp,
                "ipsec_state": p.port.ipsec_state(), "last_error": p.port.ike_error,
                "ike_sas": sas,
            })
        return out

    def _leader_name(self, name: str) -> str:
        """The IKE peer that keys interface `name` (itself, or the leader it follows)."""
        port = self.dp.ports.get(name)
        leader = getattr(port, "leader", None)
        return leader.name if leader is not None else name

    def register(self) -> None:
        """ike/show [--json] [IFACE] and ike/rekey IFACE [child|ike]."""

        def ike_show(conn, argv, aux) -> None:
            as_json = "--json" in argv
            names = [self._leader_name(a) for a in argv if a != "--json"]
            if names and names[0] not in self.sync.peers:
                conn.reply_error(f"no IKE-keyed tunnel interface named {names[0]}")
                return
            rows = self.show(names[0] if names else None)
            counters = dict(self.core.counters)
            if as_json:
                conn.reply(json.dumps({"peers": rows, "messages": counters}, indent=1) + "\n")
            else:
                conn.reply(_format(rows) + "IKE messages: " + ", ".join(
                    f"{k.replace('_', ' ')} {v}" for k, v in counters.items()) + "\n")

        def ike_rekey(conn, argv, aux) -> None:
            name = self._leader_name(argv[0])
            what = argv[1] if len(argv) > 1 else "child"
            if name not in self.sync.peers:
                conn.reply_error(f"no IKE-keyed tunnel interface named {name}")
                return
            if what not in ("child", "ike"):
                conn.reply_error(f"ike/rekey: say child or ike, not {what!r}")
                return
            now = time.monotonic()
            if what == "child":  # the CHILD_SA in use, not one that only receives
                child = child_in_use(self.core, name, self.sync.peers[name].port)
                err = command(self.core.rekey_child, name, now, child)
            else:
                err = command(self.core.rekey_ike, name, now)
            self.flush(now)
            if err is not None:
                conn.reply_error(f"{name}: cannot rekey: {err}")
            else:
                conn.reply(f"{name}: {'CHILD_SA' if what == 'child' else 'IKE SA'} rekey "
                           "started\n")

        unixctl.register("ike/show", "[--json] [IFACE]", 0, 2, ike_show)
        unixctl.register("ike/rekey", "IFACE [child|ike]", 1, 2, ike_rekey)


def _format(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "no IKE-keyed tunnels\n"
    lines = []
    for r in rows:
        lines.append(f"{r['interface']}: {r['local']} <-> {r['remote']}, {r['auth']}, "
                     f"ids {r['local_id']} <-> {r['remote_id']}, ike={r['ike']} esp={r['esp']}, "
                     f"ipsec_state {r['ipsec_state']}")
        if r["followers"]:
            lines.append(f"  also keys: {', '.join(r['followers'])}")
        if not r["ike_sas"]:
            lines.append(f"  no IKE SA; last error: {r['last_error'] or 'none'}")
        for s in r["ike_sas"]:
            lines.append(f"  IKE SA #{s['ike_id']} {s['state']} ({s['role']}), "
                         f"spi_i {s['spi_i']} spi_r {s['spi_r']}"
                         + (f", peer id {s['peer_id']}" if s["peer_id"] else "")
                         + (", IKE fragmentation" if s["fragmentation"] else ""))
            for c in s["children"]:
                lines.append(f"    CHILD_SA {c['name']} {c['state']}: spi_in {c['spi_in']} "
                             f"spi_out {c['spi_out']}, {c['esp']} {c['mode']}, "
                             f"{c['local_ts']} === {c['remote_ts']}")
    return "\n".join(lines) + "\n"
