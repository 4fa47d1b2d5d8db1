"""IKE events applied to espswitchd's ports: IKE SAs up and down, CHILD_SAs installed into
the port's ESP protection and removed from it (the port never does I/O for IKE), and the
volume rekeys (rekey_bytes, rekey_packets) the ports' counters call for. Keys are never
logged."""

from __future__ import annotations

import ovs.vlog

from espswitch.datapath.encap import UDP
from espswitch.datapath.errors import PortError
from espswitch.datapath.protection import PortRanges
from espswitch.ike import (
    ChildSaDeleted,
    ChildSaExpired,
    ChildSaInstalled,
    Event,
    IkeCore,
    IkeSaDown,
    IkeSaUp,
)
from espswitch.ike.ts import single_host
from espswitch.vswitchd.ike_peers import RETRY, IkePeer, PeerSync, child_in_use, command

__all__ = ["CHILD_LINGER", "PortEvents"]

vlog = ovs.vlog.Vlog("ike")

FLOW_PORT_MIN = 49152  # the lowest UDP source port a tunnel sends from (encap.flow_port)
CHILD_LINGER = 2.0  # seconds a deleted CHILD_SA's inbound SA still opens packets


class PortEvents:
    """What the core's events do to the ports of `peers`."""

    def __init__(self, core: IkeCore, peers: PeerSync) -> None:
        self.core, self.peers = core, peers

    def apply(self, ev: Event, now: float) -> None:
        """Log one core event and apply it to the port it concerns."""
        p = self.peers.peers.get(ev.peer)
        port = p.port if p is not None else None
        if isinstance(ev, IkeSaUp):
            what = " (rekeyed)" if ev.rekey_of is not None else ""
            vlog.info(f"{ev.peer}: IKE SA #{ev.ike_id} established{what} with "
                      f"{ev.remote_addr[0]}, {ev.local_id} <-> {ev.remote_id}, "
                      f"{'initiator' if ev.initiator else 'responder'}"
                      f"{', NAT-T' if ev.nat else ''}")
            if p is not None:
                p.last_error = None
        elif isinstance(ev, IkeSaDown):
            routine = ev.reason.startswith(("deleted", "rekeyed", "abandoned"))
            level = vlog.info if routine else vlog.warn
            level(f"{ev.peer}: IKE SA #{ev.ike_id} down: {ev.reason}")
            if port is not None:
                live = frozenset(c.spi_in for s in self.core.ike_sas(ev.peer)
                                 for c in s.children)
                if port.remove_all_children(keep=live):
                    self.peers.changed = True
                if not port.pairs:
                    p.last_error = port.ike_error = f"IKE SA down: {ev.reason}"
                    p.next_try = min(p.next_try, now + RETRY)
                    self.peers.changed = True
        elif isinstance(ev, ChildSaInstalled):
            vlog.info(f"{ev.peer}: CHILD_SA installed, spi_in 0x{ev.spi_in:08x} spi_out "
                      f"0x{ev.spi_out:08x}, {ev.transform} {ev.mode}"
                      f"{', UDP-encapsulated' if ev.encap else ''}"
                      + (f" (rekey of 0x{ev.rekey_of:08x})" if ev.rekey_of else ""))
            if port is None:
                return
            window = port.ike.replay_window
            out = ev.outbound_params()
            inb = ev.inbound_params(replay_window=window)
            sends, rx_ports = child_role(port, ev.local_ts, ev.remote_ts)
            # A second pair for what an installed pair already protects (crossing
            # initiations made two IKE SAs; one of them is about to go) is switched to as a
            # rekey's is: once the peer sends on it, or the older pair is deleted. The
            # IKE_AUTH responder has the pair before the initiator does, and sending on it
            # at once loses what the initiator cannot open yet.
            again = sends and port.sa_out is not None and not port.sa_out.expired
            try:
                port.install_child(
                    out, inb, encap=ev.encap, rekey=ev.rekey_of is not None or again,
                    encap_port=ev.remote_addr[1] if ev.encap else None, confirmed=ev.initiator,
                    inner_remote=_peer_host(ev.remote_ts, port), sends=sends, rx_ports=rx_ports)
            except PortError as e:
                vlog.err(f"{ev.peer}: CHILD_SA not installed: {e}")
                return
            self.peers.changed = True
        elif isinstance(ev, ChildSaDeleted | ChildSaExpired):
            reason = ev.reason if isinstance(ev, ChildSaDeleted) else "expired"
            vlog.info(f"{ev.peer}: CHILD_SA spi_in 0x{ev.spi_in:08x} spi_out "
                      f"0x{ev.spi_out:08x} removed: {reason}")
            # After a rekey the peer may still have packets in flight on the old SA.
            if port is not None and port.remove_child(ev.spi_in, linger=CHILD_LINGER):
                self.peers.changed = True

    def check_volume(self, name: str, p: IkePeer, now: float) -> None:
        """rekey_bytes/rekey_packets: once the SA pair in use has carried that much (either
        direction), rekey it, once. Counted here from the options as they are now, so a
        changed option applies to the SAs already installed too."""
        soft, sa_out, sa_in = p.soft, p.port.sa_out, p.port.sa_in
        if sa_out is None or sa_in is None or p.rekey_asked == sa_out.spi:
            return
        due = (soft.packets is not None and max(sa_out.packets, sa_in.packets) >= soft.packets) \
            or (soft.bytes is not None and max(sa_out.bytes, sa_in.bytes) >= soft.bytes)
        if due and command(self.core.rekey_child, name, now,
                           child_in_use(self.core, name, p.port)) is None:
            p.rekey_asked = sa_out.spi


def child_role(port, local_ts, remote_ts) -> tuple[bool, PortRanges | None]:
    """What a negotiated CHILD_SA is to a tunnel of UDP encapsulation: (whether its
    selectors cover what the tunnel sends, UDP from a flow-hashed source port to the peer's
    dst_port; the UDP ports its inbound SA may carry, when narrower than the tunnel's own
    selector, UDP to dst_port from any port). GRE, or any
    protocol that is not UDP: (True, None), the tunnel's own selector decides."""
    if port.encapsulation.PROTO != UDP:
        return True, None
    dport = port.encapsulation.dst_port
    ours = [t for t in local_ts if t.ip_proto in (0, UDP)]
    theirs = [t for t in remote_ts if t.ip_proto in (0, UDP)]
    sends = any(t.start_port <= FLOW_PORT_MIN and t.end_port == 65535 for t in ours) and \
        any(t.start_port <= dport <= t.end_port for t in theirs)
    if not ours or not theirs:
        return sends, None
    # What the peer sends within this CHILD_SA: from its ports to ours (the hull of each
    # side's ranges: selectors of one side are one range in practice).
    src = (min(t.start_port for t in theirs), max(t.end_port for t in theirs))
    dst = (min(t.start_port for t in ours), max(t.end_port for t in ours))
    if src == (0, 65535) and dst[0] <= dport <= dst[1]:
        # The tunnel's own selector (UDP to dst_port from any port) is as narrow: nothing
        # to add, and the compiled receive path may open this SA's packets.
        return sends, None
    return sends, (src, dst)


def _peer_host(selectors, port) -> bytes | None:
    """The one host the peer's selectors name, of the underlay's family: its address as it
    sees itself (tunnel mode's inner header names it so)."""
    addr = single_host(selectors)
    return addr if addr is not None and len(addr) == len(port.remote_ip) else None
