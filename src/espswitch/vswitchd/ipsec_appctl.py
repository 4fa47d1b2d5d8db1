"""`ovs-appctl -t espswitchd ipsec/show [--json] [IFACE]`: every SA, never a key."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from espswitch.datapath.tunnel_port import IpsecTunnelPort
from espswitch.vswitchd import unixctl

if TYPE_CHECKING:
    from espswitch.vswitchd.daemon import Switchd

_DROPS = (
    "auth_failed",
    "replayed",
    "too_old",
    "bad_padding",
    "malformed",
    "expired",
    "seq_exhausted",
)


def _format(rows: list[dict[str, object]]) -> str:
    lines = []
    current = None
    for r in rows:
        if r["interface"] != current:
            current = r["interface"]
            shared = f" (SAs shared with {r['shared_with']})" if "shared_with" in r else ""
            lines.append(
                f"{current}: esp={r['esp']} mode={r['mode']} encapsulation={r['encapsulation']}"
                + shared
            )
        seq = f"seq {r['seq']}"
        if "esn_high" in r:
            seq += f" (esn high {r['esn_high']})"
        if "replay_window" in r:
            seq += f", replay window {r['replay_window']}"
        drops = ", ".join(f"{d} {r[d]}" for d in _DROPS if r.get(d))
        left = r["lifetime_left"]
        if isinstance(left, dict):
            left = ", ".join(f"{v} {k}" for k, v in left.items())
        lines.append(
            f"  {r['direction']:<3} spi {r['spi']} {r['state']}: {seq}; packets {r['packets']},"
            f" bytes {r['bytes']}; failures: {drops or 'none'}; lifetime left: {left}"
        )
    return "\n".join(lines) + "\n" if lines else "no IPsec tunnels\n"


def register(sw: Switchd) -> None:
    """Register the ipsec/ commands."""
    dp = sw.dp

    def ipsec_show(conn, argv, aux) -> None:
        as_json = "--json" in argv
        names = [a for a in argv if a != "--json"]
        ports = [p for p in dp.ports.values() if isinstance(p, IpsecTunnelPort)]
        if names:
            ports = [p for p in ports if p.name == names[0]]
            if not ports:
                conn.reply_error(f"no IPsec-protected interface named {names[0]}")
                return
        rows = [row for p in sorted(ports, key=lambda p: p.name) for row in p.sa_rows()]
        if as_json:
            conn.reply(json.dumps({"sas": rows}, indent=1) + "\n")
        else:
            conn.reply(_format(rows))

    unixctl.register("ipsec/show", "[--json] [IFACE]", 0, 2, ipsec_show)
