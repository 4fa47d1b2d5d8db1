"""The compiled receive pipeline's tables, owned by the Python slow path (issue 10).

`FastTables` is what the datapath keeps for the fast path, as dpif-netdev keeps its flow
cache for ofproto: the slow path decides, the fast path only executes what was installed.
It installs into one `_fastpath.RxTable`:

- every inbound SPI that `EspProtection.fast_inbound` hands over (a compiled SA, transport
  mode, not the SA whose first packet switches a rekey over), with its tunnel's
  descriptor: the selector's addresses (IPv4 or IPv6), the encapsulation (VXLAN, Geneve,
  GRE) with its UDP port and key, the tunnel port, its bridge and the bridge the ESP
  arrives on;
- every clear tunnel's receive row (the same descriptor without an SA), and every
  tunnel's transmit row (its outbound SA or none, the outer Ethernet + IPv4/IPv6 header
  template, the encapsulation's header bytes, the next hop's NIC port);
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

from espswitch.datapath.devices import BUF_SIZE, PacketSocketDevice, TapDevice
from espswitch.datapath.encap import UDP, Geneve, Gre, Vxlan
from espswitch.datapath.fast import _fastpath, is_compiled
from espswitch.datapath.ports import DevicePort, PatchPort, SystemPort, TapPort
from espswitch.datapath.protection import Clear, EspProtection
from espswitch.datapath.tunnel import FOUND
from espswitch.datapath.tunnel_port import TunnelPort
from espswitch.datapath.underlay import Ipv4Underlay, Ipv6Underlay
from espswitch.ipsec.sa import ESP_PROTO

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.datapath import Datapath
    from espswitch.datapath.ports import Port
    from espswitch.ipsec.sa import InboundSA

__all__ = ["FastTables"]

# A flood of new source MACs moves the generation on every batch. Rebuilding a large table
# each time would make the flood cost more than the Python path it bypasses: past
# REBUILD_FREE entries, tables are rebuilt at most once every REBUILD_GAP seconds, and
# batches in between go to the Python path whole (misses: exact, only slower).
REBUILD_FREE = 512
REBUILD_GAP = 0.005

# Port classes whose `send` is their device's send plus DevicePort.count_sent (SystemPort's
# adds only the link-down case: no device, so no output installed).
_PLAIN_SENDS = (DevicePort.send, SystemPort.send)

# What the compiled pipelines push and pop, by exact type (a subclass may behave otherwise).
_UNDERLAYS = (Ipv4Underlay, Ipv6Underlay)
_ENCAPSULATIONS = {Vxlan: _fastpath.ENCAPSULATIONS["vxlan"],
                   Geneve: _fastpath.ENCAPSULATIONS["geneve"],
                   Gre: _fastpath.ENCAPSULATIONS["gre"]}


def _encapsulation(port: TunnelPort) -> int | None:
    """The compiled pipelines' number for `port`'s encapsulation; None when they do not
    carry it (GRE with checksums: computed and verified by the Python path only)."""
    enc = port.encapsulation
    kind = _ENCAPSULATIONS.get(type(enc))
    if kind is None or (type(enc) is Gre and enc.csum):
        return None
    return kind


def _as_list(frames: list[bytes] | _fastpath.RingBatch) -> list[bytes]:
    return frames.copy_all() if type(frames) is _fastpath.RingBatch else frames


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
        self.tx_ports: dict[Port, tuple[int, int]] = {}  # VM port -> (port, bridge index)
        self.tx_tunnels: set[Port] = set()
        self.rebuilds = 0
        self._built_at = -1.0
        # The transmit side also depends on the route table, the neighbour cache and when
        # the neighbour entries it used expire.
        self._routes_seq = -1
        self._neigh_seq = -1
        self._fd_seq = -1  # the installed outputs are file descriptors
        self._valid_until = 0.0
        self._size = 0  # SPIs + MAC entries last installed
        #: frames delivered by the compiled pipeline
        self.hits = 0
        #: frames it dropped (an ESP failure, counted where the Python path counts it)
        self.drops = 0
        #: frames it opened and handed up to the tunnel's Python code
        self.upcalls = 0
        #: frames it did not touch, handed to the Python path unchanged
        self.misses = 0
        #: frames from VM ports the compiled transmit pipeline sent (or its SA refused)
        self.tx_hits = 0
        #: frames from VM ports it left to the Python path
        self.tx_misses = 0
        #: batches the FastLoop finished without Python (counted in hits and tx_hits too)
        self.loop_batches = 0

    # -- tables ------------------------------------------------------------------------------

    def ensure(self) -> bool:
        """Rebuild the tables if anything changed since they were built; False when they
        are out of date and may not be rebuilt yet (see REBUILD_GAP)."""
        dp = self.dp
        if (self.gen != dp.fast_gen or self._routes_seq != dp.routes.seq
                or self._neigh_seq != dp.neigh.seq or self._fd_seq != dp.fd_seq
                or dp.now >= self._valid_until):
            if self._size > REBUILD_FREE:
                t = time.monotonic()
                if t - self._built_at < REBUILD_GAP:
                    return False
            self.rebuild()
        return True

    def current(self) -> bool:
        """Whether the installed tables are still what the slow path wants (until
        `valid_until`); the FastLoop stops when they are not."""
        dp = self.dp
        return (self.gen == dp.fast_gen and self._routes_seq == dp.routes.seq
                and self._neigh_seq == dp.neigh.seq and self._fd_seq == dp.fd_seq)

    @property
    def valid_until(self) -> float:
        """When the installed tables expire by themselves (a neighbour entry they use)."""
        return self._valid_until

    # -- the poll loop (FastLoop) --------------------------------------------------------------

    def loop_sources(self, fd_ports: dict[int, Port]) -> dict[int, tuple]:
        """What FastLoop may run itself among the polled descriptors `fd_ports`: each NIC
        port the receive tables hold whose batches stay in its ring (zero copy), and each
        VM port the transmit tables hold whose TAP reads carry offloads; as
        FastLoop.configure takes them. Ports whose `receive` is not the plain one stay
        on the Python path."""
        out: dict[int, tuple] = {}
        for fd, port in fd_ports.items():
            dev = getattr(port, "dev", None)
            where = self.rx_ports.get(port)
            if where is not None:
                layout = dev.ring_layout() if type(dev) is PacketSocketDevice else None
                if type(port).receive is SystemPort.receive and port.zero_copy and layout:
                    out[fd] = (_fastpath.LOOP_RING, where[0], where[1], dev, *layout)
                continue
            where = self.tx_ports.get(port)
            if where is not None and type(port).receive is TapPort.receive and port.vnet \
                    and type(dev) is TapDevice and dev.fd >= 0:
                out[fd] = (_fastpath.LOOP_TAP, where[0], where[1], dev, BUF_SIZE, True)
        return out

    def fold(self, loop: _fastpath.FastLoop) -> None:
        """Add what `loop` counted for the batches it finished (as `receive` counts)."""
        hits, tx_hits, batches, ports, entries = loop.fold()
        if not batches:
            return
        self.hits += hits
        self.tx_hits += tx_hits
        self.loop_batches += batches
        table_ports = self.ports
        for i, rx_p, rx_b, tx_p, tx_b in ports:
            st = table_ports[i].stats
            if rx_p or rx_b:
                st["rx_packets"] += rx_p
                st["rx_bytes"] += rx_b
            if tx_p or tx_b:
                st["tx_packets"] += tx_p
                st["tx_bytes"] += tx_b
        now = self.dp.now
        table_entries = self.entries
        for e in entries:
            table_entries[e][1] = now

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
        clears = []
        for p in ports:
            row = self._clear_row(p, pidx, bidx)
            if row is not None:
                clears.append(row)
                egress.add(p.underlay.egress_bridge)
        macs: list[tuple[int, bytes, int]] = []
        entries: list[list] = []
        entry_of: dict[tuple[Bridge, bytes], int] = {}
        for b in bridges:
            for (vid, mac), entry in b.macs.items():
                i = pidx.get(entry[0])
                if vid == 0 and i is not None:
                    entry_of[(b, mac)] = len(entries)
                    macs.append((bidx[b], mac, i))
                    entries.append(entry)
        out_ok = [isinstance(p, DevicePort) and p.tag is None and p.trunks is None
                  for p in ports]
        self.table.set(spis, macs, out_ok)
        self.table.set_clear(clears)
        self.table.set_outputs([self._output(p) if ok else None
                                for p, ok in zip(ports, out_ok, strict=True)])
        self._fd_seq = dp.fd_seq
        # A patch port could carry a miss to a VM ahead of a hit: such bridges stay slow.
        patched = {p.bridge for p in ports if isinstance(p, PatchPort)}
        self.rx_ports = {p: (pidx[p], bidx[p.bridge]) for p in ports
                         if isinstance(p, SystemPort) and p.bridge in egress
                         and p.bridge not in patched and p.tag is None and p.trunks is None}
        for p in ports:
            if isinstance(p, SystemPort):
                p.zero_copy = p in self.rx_ports
        self._routes_seq = dp.routes.seq
        self._neigh_seq = dp.neigh.seq
        self._valid_until = float("inf")
        tuns = []
        for p in ports:
            row = self._tx_row(p, pidx, entry_of, out_ok)
            if row is not None:
                tuns.append(row)
        self.tx_tunnels = {ports[row[0]] for row in tuns}
        tunnel_bridges = {p.bridge for p in self.tx_tunnels}
        tx_in = [isinstance(p, TapPort) and p.bridge in tunnel_bridges
                 and not p.bridge.local_ips and p.bridge not in patched
                 and p.tag is None and p.trunks is None for p in ports]
        self.table.set_tx(tuns, tx_in)
        self.tx_ports = {p: (pidx[p], bidx[p.bridge]) for p, ok in zip(ports, tx_in,
                                                                         strict=True) if ok}
        self._size = len(spis) + len(macs) + len(tuns)
        self._built_at = time.monotonic()
        self.ports, self.entries, self.spis = ports, entries, owners

    @staticmethod
    def _output(port: Port) -> tuple[int, int] | None:
        """The output the compiled pipelines write to port `port` themselves: its device's
        `fast_output`, when the port's `send` is the device's send and its counters
        (`DevicePort.count_sent`); None: the port's own `send`, from Python."""
        if type(port).send not in _PLAIN_SENDS:
            return None
        dev = port.dev
        fast_output = getattr(dev, "fast_output", None)
        return fast_output() if fast_output is not None else None

    def _tx_row(self, port: Port, pidx: dict, entry_of: dict, out_ok: list[bool]
                ) -> tuple | None:
        """The transmit table row of tunnel `port`; None when what it sends must take the
        Python path (not clear or ESP transport mode with a compiled SA, an encapsulation
        or underlay the compiled path does not write, no route, next hop not resolved or
        not learned on a plain NIC port, ...)."""
        if not isinstance(port, TunnelPort) or port.tag is not None or port.trunks is not None:
            return None
        if type(port.underlay) not in _UNDERLAYS:
            return None
        kind = _encapsulation(port)
        if kind is None:
            return None
        prot = port.protection
        enc = port.encapsulation
        if isinstance(prot, EspProtection):
            sa = prot.fast_outbound()
            if sa is None or not is_compiled(sa) or sa.expired:
                return None
            proto, df = ESP_PROTO, True
        elif type(prot) is Clear:
            # What the compiled path counts IPv4 IDs in (IPv6 headers have none).
            sa = port.underlay.ip_ids
            proto, df = enc.PROTO, port.underlay.df
        else:
            return None
        u = port.underlay
        if u.stale():
            port.resolve()
        bridge, internal = u.egress_bridge, u.egress_port
        if bridge is None or internal is None or u.local_ip is None:
            return None
        if internal.tag is not None or internal.trunks is not None:
            return None
        dp = self.dp
        state, mac = dp.neigh.lookup(bridge.name, u.nexthop, dp.now)
        if state != FOUND or mac is None or mac[0] & 1:
            return None
        self._valid_until = min(self._valid_until, dp.neigh.entries[(bridge.name, u.nexthop)][1])
        nic = bridge.macs.get((0, mac))
        phy_entry = entry_of.get((bridge, internal.mac))
        if nic is None or phy_entry is None or bridge.macs[(0, internal.mac)][0] is not internal:
            return None
        out = pidx.get(nic[0])
        if out is None or nic[0] is internal or not out_ok[out]:
            return None
        head = mac + internal.mac + u.ETHERTYPE + u.template(proto, df)
        # The encapsulation's own bytes, from its push of an empty frame: after the UDP
        # header for VXLAN and Geneve (the UDP ports and length are written per packet),
        # the whole header for GRE.
        pushed = enc.push(b"")
        if len(pushed) != enc.overhead:
            return None
        enc_head = pushed[8:] if enc.PROTO == UDP else pushed
        return (pidx[port], sa, head, kind, enc.dst_port, enc_head, port.max_frame, out,
                phy_entry)

    def _spi_row(self, spi: int, esp: EspProtection, pidx: dict, bidx: dict
                 ) -> tuple[tuple, InboundSA, Bridge] | None:
        """The table row for `spi`, its SA and the bridge its ESP arrives on; None when
        the fast path must leave its packets to Python."""
        sa = esp.fast_inbound(spi)
        port = esp.port
        sel = esp.selector
        if sa is None or not is_compiled(sa) or sel is None or port not in pidx:
            return None
        if type(port.underlay) not in _UNDERLAYS:
            return None
        enc = port.encapsulation
        kind = _encapsulation(port)
        # The compiled path checks the tunnel's own selector: its protocol and UDP port.
        if kind is None or sel.proto != enc.PROTO or sel.dport != enc.dst_port:
            return None
        # The bridge's own rules decide what an inner frame does there: only the plain
        # case (untagged tunnel port, no tunnel endpoint on that bridge) is installed.
        if port.tag is not None or port.trunks is not None or port.bridge.local_ips:
            return None
        out_bridge = port.underlay.egress_bridge
        if out_bridge is None or out_bridge not in bidx or sel.dst not in out_bridge.local_ips:
            return None
        return ((spi, sa, sel.src, sel.dst, kind, sel.dport, enc.key, pidx[port],
                 bidx[port.bridge], bidx[out_bridge]), sa, out_bridge)

    @staticmethod
    def _clear_row(port: Port, pidx: dict, bidx: dict) -> tuple | None:
        """The receive row of a clear tunnel; None when its packets must take the Python
        path (the same plain cases as an SPI's row)."""
        if not isinstance(port, TunnelPort) or type(port.protection) is not Clear:
            return None
        if type(port.underlay) not in _UNDERLAYS:
            return None
        enc = port.encapsulation
        kind = _ENCAPSULATIONS.get(type(enc))  # (GRE checksums: such packets are misses)
        if kind is None or port not in pidx:
            return None
        if port.tag is not None or port.trunks is not None or port.bridge.local_ips:
            return None
        u = port.underlay
        if u.stale():
            port.resolve()
        out_bridge = u.egress_bridge
        if out_bridge is None or out_bridge not in bidx or u.local_ip is None:
            return None
        if u.local_ip not in out_bridge.local_ips:
            return None
        return (u.remote_ip, u.local_ip, kind, enc.dst_port, enc.key, pidx[port],
                bidx[port.bridge], bidx[out_bridge])

    # -- frames ------------------------------------------------------------------------------

    def receive(self, port: Port, frames: list[bytes] | _fastpath.RingBatch) -> list[bytes]:
        """Run a batch received on `port` through the compiled pipeline; returns the frames
        it did not touch (all of them when `port` is not a fast NIC or VM port), for the
        Python path, as bytes (from a RingBatch, copies: the caller releases the batch)."""
        if not self.ensure():
            if port in self.rx_ports:
                self.misses += len(frames)
            elif port in self.tx_ports:
                self.tx_misses += len(frames)
            return _as_list(frames)
        where = self.rx_ports.get(port)
        if where is None:
            where = self.tx_ports.get(port)
            if where is None:  # neither a NIC port on a tunnel's egress bridge nor a VM's
                return _as_list(frames)
            frames = _as_list(frames)
            return self._transmit(port, frames, _fastpath.tx_burst(
                self.table, frames, where[0], where[1], port.vnet))
        return self._received(port, frames, _fastpath.rx_burst(
            self.table, frames, where[0], where[1]))

    def finish(self, port: Port, frames: list[bytes] | _fastpath.RingBatch,
               result: tuple) -> list[bytes]:
        """`receive` for a batch whose burst already ran (`result`: the FastLoop's
        rx_burst or tx_burst result for these frames, with the tables as they are)."""
        if port in self.rx_ports:
            return self._received(port, frames, result)
        return self._transmit(port, _as_list(frames), result)

    def _received(self, port: Port, frames: list[bytes] | _fastpath.RingBatch,
                  result: tuple) -> list[bytes]:
        """The side effects of rx_burst's `result` for `frames` from NIC port `port`, as
        the Python path would have had them; returns the misses."""
        kinds, outputs, written, tunnel_rx, upcalls, drops, touched = result
        dp = self.dp
        entries = self.entries
        # What the port's bridge counted and learned for every frame it would have seen.
        ring = type(frames) is _fastpath.RingBatch
        total = frames.nbytes if ring else sum(map(len, frames))
        if kinds.count(0):
            if ring:
                missed = frames.copies(kinds)
            else:
                missed = [f for f, k in zip(frames, kinds, strict=True) if not k]
            nbytes = total - sum(map(len, missed))
        else:
            missed = []
            nbytes = total
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
            spis[s][0].count_open_drop(reason, _outer_src(frames[i]))
        ports = self.ports
        if tunnel_rx:
            # Counted as the tunnel port's bridge counts what it forwards, then sent
            # through each port's own `send` (TAP GRO, counters), one batch per port, or
            # written already by the compiled code exactly as that `send` writes.
            for t, (n, b) in tunnel_rx.items():
                st = ports[t].stats
                st["rx_packets"] += n
                st["rx_bytes"] += b
            self._deliver(outputs, written)
        for i, s, nh, payload in upcalls:
            esp, sa = spis[s]
            f = frames[i]
            esp.input_opened(sa, _outer_src(f), _outer_dst(f), nh, payload)
        return missed

    def _transmit(self, port: Port, frames: list[bytes], result: tuple) -> list[bytes]:
        """The side effects of tx_burst's `result` for a batch from VM port `port`, as the
        Python path would have had them; returns the misses (reads as they came: with
        their virtio-net header when the port's device gives one)."""
        kinds, outputs, written, tunnel_tx, drops, touched, taken = result
        dp = self.dp
        missed = [f for f, k in zip(frames, kinds, strict=True) if not k] if kinds.count(0) else []
        self.tx_misses += len(missed)
        if not taken[0]:
            return missed
        self.tx_hits += taken[0]
        st = port.stats
        st["rx_packets"] += taken[0]
        st["rx_bytes"] += taken[1]
        now = dp.now
        entries = self.entries
        for e in touched:
            entries[e][1] = now
        ports = self.ports
        for t, (n, b) in tunnel_tx.items():
            st = ports[t].stats
            st["tx_packets"] += n
            st["tx_bytes"] += b
        for _i, t, _reason in drops:
            # As EspProtection.protect counts what the SA refuses.
            st = ports[t].stats
            st["esp_expired_drops"] += 1
            st["tx_dropped"] += 1
        self._deliver(outputs, written)
        return missed

    def _deliver(self, outputs: dict[int, list[bytes]], written: dict[int, tuple]) -> None:
        """What a burst forwarded: the counts of what it wrote itself (as the port's `send`
        counts them), then the rest through each port's `send`, one batch per port."""
        ports = self.ports
        for out, (nbytes, result) in written.items():
            ports[out].count_sent(nbytes, result)
        transmit = self.dp.transmit
        for out, lst in outputs.items():
            transmit(ports[out], lst)


# The outer addresses of a frame the compiled pipeline took: untagged IPv4 without options,
# or IPv6 without extension headers (the only ones it classifies).
def _outer_src(frame: bytes) -> bytes:
    return bytes(frame[22:38] if frame[12] == 0x86 else frame[26:30])


def _outer_dst(frame: bytes) -> bytes:
    return bytes(frame[38:54] if frame[12] == 0x86 else frame[30:34])
