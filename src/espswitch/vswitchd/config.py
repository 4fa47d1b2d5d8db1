"""From database rows to typed configuration, and the reconcile plan (no I/O, no ovs.*).

Rows are anything with the IDL's attributes (`name`, `ports`, `interfaces`, `tag`, ...), so
the logic is tested on plain objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class IfaceConfig:
    """What the database asks for one interface."""

    name: str
    bridge: str
    port: str
    type: str
    options: tuple[tuple[str, str], ...] = ()
    tag: int | None = None
    trunks: frozenset[int] | None = None
    ofport_request: int | None = None
    mtu_request: int | None = None

    def device_key(self) -> tuple:
        """What forces the port to be created again when it changes."""
        return (self.bridge, self.type or "system", self.options)

    def vlan(self) -> tuple[int | None, frozenset[int] | None]:
        return self.tag, self.trunks


@dataclass(slots=True)
class Desired:
    bridges: set[str] = field(default_factory=set)
    ifaces: dict[str, IfaceConfig] = field(default_factory=dict)
    # interface name -> error sentence for configurations refused before the datapath
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Plan:
    del_ports: list[str] = field(default_factory=list)
    del_bridges: list[str] = field(default_factory=list)
    add_bridges: list[str] = field(default_factory=list)
    add_ports: list[IfaceConfig] = field(default_factory=list)
    vlan_updates: list[IfaceConfig] = field(default_factory=list)
    # kept interfaces whose Interface.mtu_request changed
    mtu_updates: list[IfaceConfig] = field(default_factory=list)


def _opt(value):
    """An optional column: the IDL gives a list of 0 or 1 items."""
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


def desired_state(bridge_rows: Iterable) -> Desired:
    """Turn Bridge rows (with their Port and Interface rows) into the desired datapath."""
    d = Desired()
    seen: dict[str, str] = {}
    for br in sorted(bridge_rows, key=lambda r: r.name):
        if br.name in d.bridges:
            continue
        d.bridges.add(br.name)
        for port in sorted(br.ports, key=lambda r: r.name):
            ifaces = sorted(port.interfaces, key=lambda r: r.name)
            tag = _opt(port.tag)
            trunks = frozenset(int(t) for t in (port.trunks or ())) or None
            for iface in ifaces:
                if iface.name in seen:
                    d.errors[iface.name] = (
                        f"interface {iface.name} is in both bridge {seen[iface.name]} "
                        f"and bridge {br.name}"
                    )
                    d.ifaces.pop(iface.name, None)
                    continue
                seen[iface.name] = br.name
                if len(ifaces) > 1:
                    d.errors[iface.name] = (
                        f"port {port.name} has {len(ifaces)} interfaces: bonds are not supported"
                    )
                    continue
                d.ifaces[iface.name] = IfaceConfig(
                    name=iface.name,
                    bridge=br.name,
                    port=port.name,
                    type=iface.type or "",
                    options=tuple(sorted((str(k), str(v)) for k, v in iface.options.items())),
                    tag=int(tag) if tag is not None else None,
                    trunks=trunks,
                    ofport_request=_opt(getattr(iface, "ofport_request", None)),
                    mtu_request=_opt(getattr(iface, "mtu_request", None)),
                )
    return d


def plan(desired: Desired, current: dict[str, IfaceConfig], current_bridges: set[str]) -> Plan:
    """What to do to get from `current` to `desired`: deletions first, then additions.

    `current` holds the interfaces that exist in the datapath; interfaces that failed are
    absent from it, so they are tried again.
    """
    p = Plan()
    for name, cur in sorted(current.items()):
        want = desired.ifaces.get(name)
        if (
            want is None
            or want.device_key() != cur.device_key()
            or want.bridge not in desired.bridges
        ):
            p.del_ports.append(name)
        else:
            if want.vlan() != cur.vlan():
                p.vlan_updates.append(want)
            if want.mtu_request != cur.mtu_request:
                p.mtu_updates.append(want)
    p.del_bridges = sorted(current_bridges - desired.bridges)
    p.add_bridges = sorted(desired.bridges - current_bridges)
    kept = set(current) - set(p.del_ports)
    # The bridge's own internal port first, so tunnels find their egress bridge.
    adds = [c for n, c in desired.ifaces.items() if n not in kept]
    adds.sort(key=lambda c: (c.bridge, c.name != c.bridge, c.type in ("vxlan", "patch"), c.name))
    p.add_ports = adds
    return p
