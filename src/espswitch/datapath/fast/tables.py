"""The compiled receive pipeline's tables, owned by the Python slow path (issue 10).

`FastTables` is what the datapath keeps for the fast path, as dpif-netdev keeps its flow
cache for ofproto: the slow path decides, the fast path only executes what was installed.
It installs into one `_fastpath.RxTable`:

- every inbound SPI that `EspProtection.fast_inbound` hands over (a compiled SA, transport
  mode, VXLAN, not the SA whose first packet switches a rekey over), with its tunnel's
  descriptor: the selector's addresses and UDP port, the VNI, the tunnel port, its bridge
  and the bridge the ESP arrives on;
- every MAC entry the bridges learned on VLAN 0, and which ports may be a fast output
  (a device port, untagged and not a trunk).

Invalidation is by generation: the datapath bumps `Datapath.fast_gen` on every change
that could make an installed entry wrong (SA install/remove/rekey switch, selector or
route change, port add/remove/VLAN change, MAC learned/moved/aged/flushed), and the
tables are rebuilt before the next burst that sees the number moved. The fast path never
learns: a frame whose MAC entries would change is a miss, and Python learns from it.

`receive(port, frames)` runs one batch from a NIC port through the compiled `rx_burst`
and performs, in Python and exactly as the Python path would, every side effect it
reported: port counters (the NIC's rx, the tunnel's rx, ESP drop causes), the MAC
entries' ages, the output through each port's own `send`; what was opened but not
finished goes to `EspProtection.input_opened`; the untouched misses are returned.

Import only when `espswitch.datapath.fast.AVAILABLE` is true.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from espswitch.datapath.encap import UDP, Vxlan
from espswitch.datapath.fast import _fastpath, is_compiled
from espswitch.datapath.ports import DevicePort, PatchPort, SystemPort

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.datapath import Datapath
    from espswitch.datapath.ports import Port
    from espswitch.datapath.protection import EspProtection
    from espswitch.ipsec.sa import InboundSA

__all__ = ["FastTables"]

# A flood of new source MACs moves the generation on every batch. Rebuilding a large table
# each time would make the flood cost more than the Python path it bypasses: past
# REBUILD_FREE entries, tables are rebuilt at most once every REBUILD_GAP seconds, and
# batches in between go to the Python path whole (misses: exact, only slower).
REBUILD_FREE = 512
REBUILD_GAP = 0.005


class FastTables:
    """The receive tables of one datapath, rebuilt when its generation number moved."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.gen = -1
        self.table = _fastpath.RxTable()
        self.ports: list[Port] = []  # port index -> port
        self.rx_ports: dict[Port, tuple[int, int]] = {}  # NIC port -> (port, bridge index)
        self.entries: list[list] = []  # MAC entry index -> the bridge's [port, last_seen]
        self.spis: list[tuple[EspProtection, InboundSA]] = []  # SPI index -> (ESP, SA)
        self.rebuilds = 0
        self._built_at = -1.0
        self._size = 0  # SPIs + MAC entries last installed
        #: frames delivered by the compiled pipeline
        self.hits = 0
        #: frames it dropped (an ESP failure, counted where the Python path counts it)
        self.drops = 0
        #: frames it opened and handed up to the tunnel's Python code
        self.upcalls = 0
        #: frames it did not touch, handed to the Python path unchanged
        self.misses = 0

    # -- tables ------------------------------------------------------------------------------

    def ensure(self) -> bool:
        """Rebuild the tables if anything changed since they were built; False when they
        are out of date and may not be rebuilt yet (see REBUILD_GAP)."""
        if self.gen != self.dp.fast_gen:
            if self._size > REBUILD_FREE:
                t = time.monotonic()
                if t - self._built_at < REBUILD_GAP:
                    return False
            self.rebuild()
        return True

    def rebuild(self) -> None:
        """Install everything the slow path knows that the fast path can execute."""
        dp = self.dp
        self.gen = dp.fast_gen
        self.rebuilds += 1
        ports = list(dp.ports.values())
        pidx = {p: i for i, p in enumerate(ports)}
        bridges = list(dp.bridges.values())
        bidx = {b: i for i, b in enumerate(bridges)}
        spis: list[tuple] = []
        owners: list[tuple[EspProtection, InboundSA]] = []
        egress: set[Bridge] = set()
        layer = dp.tunnels.ipsec
        for spi, esp in (layer.protections.items() if layer is not None else ()):
            row = self._spi_row(spi, esp, pidx, bidx)
            if row is not None:
                spis.append(row[0])
                owners.append((esp, row[1]))
                egress.add(row[2])
        macs: list[tuple[int, bytes, int]] = []
        entries: list[list] = []
        for b in bridges:
            for (vid, mac), entry in b.macs.items():
                i = pidx.get(entry[0])
                if vid == 0 and i is not None:
                    macs.append((bidx[b], mac, i))
                    entries.append(entry)
        out_ok = [isinstance(p, DevicePort) and p.tag is None and p.trunks is None
                  for p in ports]
        self.table.set(spis, macs, out_ok)
        self._size = len(spis) + len(macs)
        self._built_at = time.monotonic()
        self.ports, self.entries, self.spis = ports, entries, owners
        # A patch port could carry a miss to a VM ahead of a hit: such bridges stay slow.
        patched = {p.bridge for p in ports if isinstance(p, PatchPort)}
        self.rx_ports = {p: (pidx[p], bidx[p.bridge]) for p in ports
                         if isinstance(p, SystemPort) and p.bridge in egress
                         and p.bridge not in patched and p.tag is None and p.trunks is None}

    def _spi_row(self, spi: int, esp: EspProtection, pidx: dict, bidx: dict
                 ) -> tuple[tuple, InboundSA, Bridge] | None:
        """The table row for `spi`, its SA and the bridge its ESP arrives on; None when
        the fast path must leave its packets to Python."""
        sa = esp.fast_inbound(spi)
        port = esp.port
        sel = esp.selector
        if sa is None or not is_compiled(sa) or sel is None or port not in pidx:
            return None
        if len(sel.dst) != 4:
            return None  # the compiled pipeline parses IPv4 only: IPv6 takes the Python path
        enc = port.encapsulation
        if type(enc) is not Vxlan or sel.proto != UDP or sel.dport != enc.dst_port:
            return None
        # The bridge's own rules decide what an inner frame does there: only the plain
        # case (untagged tunnel port, no tunnel endpoint on that bridge) is installed.
        if port.tag is not None or port.trunks is not None or port.bridge.local_ips:
            return None
        out_bridge = port.underlay.egress_bridge
        if out_bridge is None or out_bridge not in bidx or sel.dst not in out_bridge.local_ips:
            return None
        return ((spi, sa, sel.src, sel.dst, sel.dport, enc.key, pidx[port], bidx[port.bridge],
                 bidx[out_bridge]), sa, out_bridge)

    # -- frames ------------------------------------------------------------------------------

    def receive(self, port: Port, frames: list[bytes]) -> list[bytes]:
        """Run a batch received on `port` through the compiled pipeline; returns the frames
        it did not touch (all of them when `port` is not a fast NIC port), for the
        Python path."""
        if not self.ensure():
            if port in self.rx_ports:
                self.misses += len(frames)
            return frames
        where = self.rx_ports.get(port)
        if where is None:  # not a NIC port on a tunnel's egress bridge
            return frames
        kinds, outputs, tunnel_rx, upcalls, drops, touched = _fastpath.rx_burst(
            self.table, frames, where[0], where[1])
        dp = self.dp
        entries = self.entries
        # What the port's bridge counted and learned for every frame it would have seen.
        if kinds.count(0):
            missed = [f for f, k in zip(frames, kinds, strict=True) if not k]
            nbytes = sum(map(len, frames)) - sum(map(len, missed))
        else:
            missed = []
            nbytes = sum(map(len, frames))
        taken = len(frames) - len(missed)
        if taken:
            st = port.stats
            st["rx_packets"] += taken
            st["rx_bytes"] += nbytes
            now = dp.now
            for e in touched:
                entries[e][1] = now
        self.misses += len(missed)
        self.drops += len(drops)
        self.upcalls += len(upcalls)
        self.hits += taken - len(drops) - len(upcalls)
        spis = self.spis
        for i, s, reason in drops:
            spis[s][0].count_open_drop(reason, frames[i][26:30])
        ports = self.ports
        if outputs:
            # Counted as the tunnel port's bridge counts what it forwards, then sent
            # through each port's own `send` (TAP GRO, counters), one batch per port.
            for t, (n, b) in tunnel_rx.items():
                st = ports[t].stats
                st["rx_packets"] += n
                st["rx_bytes"] += b
            transmit = dp.transmit
            for out, lst in outputs.items():
                transmit(ports[out], lst)
        for i, s, nh, payload in upcalls:
            esp, sa = spis[s]
            f = frames[i]
            esp.input_opened(sa, bytes(f[26:30]), bytes(f[30:34]), nh, payload)
        return missed
