"""The datapath: bridges, ports, and the tunnel layer, driven by batches of frames.

Sans-IO apart from the device provider: callers inject batches with `receive(port, frames)`
and call `run(now)` for housekeeping.  The event loop (loop.py) is the I/O shell around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from espswitch.datapath import fast, tunnel_port  # noqa: F401  (tunnel_port registers types)
from espswitch.datapath.bridge import Bridge
from espswitch.datapath.context import PortContext
from espswitch.datapath.devices import LinuxDevices
from espswitch.datapath.errors import PortError
from espswitch.datapath.ports import InternalPort, Port, port_class
from espswitch.datapath.tunnel import NeighborCache, RouteTable
from espswitch.datapath.tunnel_layer import TunnelLayer

# A batch still in a NIC's receive ring (SystemPort.zero_copy): read in place by the
# compiled pipeline, copied only for the Python path, released once the batch is done.
_RingBatch = fast._fastpath.RingBatch if fast.AVAILABLE else None

if TYPE_CHECKING:
    from espswitch.datapath.fast.tables import FastTables

OFPP_LOCAL = 65534
OFPP_MAX = 65279
MAX_DEPTH = 8


class Datapath:
    """All bridges of one espswitchd."""

    def __init__(
        self,
        devices=None,
        log: Callable[[str], None] | None = None,
        log_rl: Callable[[str], None] | None = None,
    ) -> None:
        self.devices = devices if devices is not None else LinuxDevices()
        self.bridges: dict[str, Bridge] = {}
        self.ports: dict[str, Port] = {}
        self.routes = RouteTable()
        self.neigh = NeighborCache()
        self.tunnels = TunnelLayer(self)
        self.now = time.monotonic()
        self.drops: dict[str, int] = {}
        self.fd_seq = 0  # bumped when the set of pollable ports changes
        self._depth = 0
        self._rx_deferred: list[tuple[Port, bytes]] = []
        self._log = log or (lambda msg: None)
        self.log_rl = log_rl or self._log
        self._drop_log_at = -1.0
        #: bumped on every change the fast path's tables depend on (fast/tables.py)
        self.fast_gen = 0
        self._fast: FastTables | None = None
        self.ctx = PortContext(self)  # what ports may use of this datapath
        # The compiled fast path when it is built (and other_config:fast-path is not
        # false): NIC batches through the receive pipeline, compiled SAs for the SAs
        # installed from now on; the Python path and engine otherwise.
        self.fast_path = fast.AVAILABLE

    @property
    def fast_path(self) -> bool:
        """Whether NIC batches go through the compiled receive pipeline first (default:
        when the module is built). Off: everything takes the Python path."""
        return self._fast is not None

    @fast_path.setter
    def fast_path(self, on: bool) -> None:
        if on and not fast.AVAILABLE:
            raise ValueError(fast.REASON)
        if on and self._fast is None:
            from espswitch.datapath.fast.tables import FastTables

            self._fast = FastTables(self)
        elif not on:
            self._fast = None
            for p in self.ports.values():
                if getattr(p, "zero_copy", False):
                    p.zero_copy = False  # nothing reads a ring batch in place any more

    @property
    def fast_tables(self) -> FastTables | None:
        """The compiled pipelines' tables while the fast path is on."""
        return self._fast

    def fast_changed(self) -> None:
        """Something the fast path's tables are built from changed: rebuild before the
        next batch."""
        self.fast_gen += 1

    def mtus_changed(self) -> None:
        """A device's MTU changed: tunnels size themselves again (their MTU follows their
        egress device's), and the fast path's tables with them."""
        self.tunnels.route_seq = -1
        self.fast_gen += 1

    def drop_log_due(self) -> bool:
        """Whether a per-packet drop may be logged now: at most one per 0.1 s of `now`, so
        that a flood costs one float comparison per packet, not a formatted message."""
        if self.now - self._drop_log_at < 0.1:
            return False
        self._drop_log_at = self.now
        return True

    # --- configuration ---------------------------------------------------------------------
    def add_bridge(self, name: str) -> Bridge:
        if name in self.bridges:
            return self.bridges[name]
        b = Bridge(self, name)
        self.bridges[name] = b
        self.tunnels.update_local_ips()
        return b

    def del_bridge(self, name: str) -> None:
        b = self.bridges.get(name)
        if b is None:
            return
        for p in list(b.ports):
            self.del_port(p.name)
        del self.bridges[name]
        self.tunnels.route_seq = -1  # tunnels routed through it must resolve again
        self.fast_gen += 1

    def add_port(
        self,
        bridge: str,
        name: str,
        type_: str,
        options: Mapping[str, str] | None = None,
        tag: int | None = None,
        trunks: frozenset[int] | None = None,
        ofport: int | None = None,
    ) -> Port:
        """Create and open a port; raise PortError (one sentence) if it cannot work."""
        b = self.bridges.get(bridge)
        if b is None:
            raise PortError(f"bridge {bridge} does not exist")
        if name in self.ports:
            other = self.ports[name].bridge.name
            raise PortError(f"interface {name} already exists on bridge {other}")
        try:
            cls = port_class(type_).variant(options or {})
        except PortError as e:  # the variant's reasons do not know the port's name
            raise PortError(f"interface {name}: {e}") from None
        port = cls(self.ctx, b, name, options or {})
        port.set_vlan(tag, trunks)
        port.ofport = self._pick_ofport(b, port, ofport)
        port.open()
        self.ports[name] = port
        b.add_port(port)
        if port.fileno() is not None:
            self.fd_seq += 1
        if isinstance(port, InternalPort):
            self.tunnels.route_seq = -1  # an egress bridge may have appeared
        self.fast_gen += 1
        return port

    def _pick_ofport(self, b: Bridge, port: Port, wanted: int | None) -> int:
        if port.name == b.name:
            return OFPP_LOCAL
        used = {p.ofport for p in b.ports}
        if wanted is not None and 1 <= wanted <= OFPP_MAX and wanted not in used:
            return wanted
        n = 1
        while n in used:
            n += 1
        return n

    def del_port(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is None:
            return
        port.bridge.remove_port(port)
        had_fd = port.fileno() is not None
        port.close()
        if had_fd:
            self.fd_seq += 1
        self._rx_deferred = [e for e in self._rx_deferred if e[0] is not port]
        if isinstance(port, InternalPort):
            self.tunnels.route_seq = -1
        self.fast_gen += 1

    def internal_port(self, dev: str) -> tuple[Bridge, Port] | None:
        """The bridge and internal port behind the kernel device `dev`, if it is one."""
        port = self.ports.get(dev)
        if isinstance(port, InternalPort):
            return port.bridge, port
        return None

    def close(self) -> None:
        for name in list(self.bridges):
            self.del_bridge(name)

    # --- frames --------------------------------------------------------------------------
    def receive(self, port: Port, frames: list[bytes], result: tuple | None = None) -> None:
        """A batch arrived on `port`: forward it through the port's bridge. From a port
        whose device offloads (`port.vnet`), each read starts with a virtio-net header and
        may stand for several frames (datapath/gso.py).

        With the fast path on, a batch from outside (not one the datapath itself passes
        on) goes through the compiled receive pipeline first; only its misses take the
        Python path. A batch still in a NIC's receive ring (`RingBatch`, from a
        `SystemPort` with `zero_copy`) is read there and released before this returns.
        With `result`, the compiled burst already ran on the batch (the FastLoop's): only
        its side effects and misses are left to do."""
        self._depth += 1
        try:
            batch = frames if type(frames) is _RingBatch else None
            try:
                if result is not None:
                    frames = self._fast.finish(port, frames, result)
                elif self._fast is not None and self._depth == 1:
                    frames = self._fast.receive(port, frames)
                elif batch is not None:
                    frames = batch.copy_all()
            finally:
                if batch is not None:
                    batch.release()
            if frames and port.vnet:
                frames = port.complete(frames)
            if frames:
                port.bridge.process(port, frames)
        finally:
            self._depth -= 1
        if self._depth == 0:
            self._flush()

    def transmit(self, port: Port, frames: list[bytes]) -> None:
        if self._depth > MAX_DEPTH:
            port.stats.drop("tx_queue_full", len(frames))
            self.count_drop("recursion_too_deep", len(frames))
            return
        port.send(frames)

    def defer_rx(self, port: Port, frame: bytes) -> None:
        """Queue a frame to enter `port`'s bridge once the current batch is done."""
        self._rx_deferred.append((port, frame))

    def _flush(self) -> None:
        while self._rx_deferred or self.tunnels.ready:
            pending, self._rx_deferred = self._rx_deferred, []
            groups: dict[Port, list[bytes]] = {}
            for port, frame in pending:
                lst = groups.get(port)
                if lst is None:
                    lst = groups[port] = []
                lst.append(frame)
            self._depth += 1
            try:
                for port, frames in groups.items():
                    if port.name in self.ports:
                        port.bridge.process(port, frames)
                self.tunnels.flush_ready()
            finally:
                self._depth -= 1

    def count_drop(self, cause: str, n: int = 1) -> None:
        self.drops[cause] = self.drops.get(cause, 0) + n

    # --- housekeeping --------------------------------------------------------------------
    def run(self, now: float) -> None:
        self.now = now
        for b in self.bridges.values():
            b.run(now)
        for p in list(self.ports.values()):
            p.run(now)
        self.neigh.run(now)
        self.tunnels.run(now)
        self._flush()

    def pollable(self) -> dict[int, Port]:
        """File descriptor -> port for every port that has one."""
        out = {}
        for p in self.ports.values():
            fd = p.fileno()
            if fd is not None and fd >= 0:
                out[fd] = p
        return out

    # --- show ----------------------------------------------------------------------------
    def show(self) -> str:
        lines = ["espswitch@netdev:"]
        f = self._fast
        if f is not None:
            lines.append(f"  fast-path: enabled, hits={f.hits} esp_drops={f.drops} "
                         f"upcalls={f.upcalls} misses={f.misses} tx_hits={f.tx_hits} "
                         f"tx_misses={f.tx_misses} rebuilds={f.rebuilds} "
                         f"loop_batches={f.loop_batches}")
        else:
            why = "off" if fast.AVAILABLE else fast.REASON
            lines.append(f"  fast-path: disabled ({why})")
        if self.drops:
            drops = ", ".join(f"{k}={v}" for k, v in sorted(self.drops.items()))
            lines.append(f"  drops: {drops}")
        for bname in sorted(self.bridges):
            b = self.bridges[bname]
            lines.append(f"  {bname}:")
            for p in sorted(b.ports, key=lambda p: p.ofport):
                vlan = ""
                if p.tag is not None:
                    vlan = f" tag={p.tag}"
                elif p.trunks:
                    vlan = f" trunks={','.join(map(str, sorted(p.trunks)))}"
                path = ""
                if f is not None:
                    if p in f.rx_ports:
                        # zero-copy: its batches are read in the NIC's ring, in place.
                        ring = p.zero_copy and getattr(p.dev, "has_ring", False)
                        path = " fast-rx zero-copy" if ring else " fast-rx"
                    elif p in f.tx_ports:
                        path = " fast-tx"
                    elif p in f.tx_tunnels:
                        path = " fast-tx-tunnel"
                lines.append(f"    {p.name} {p.ofport}: ({p.describe()}){vlan}{path}")
        return "\n".join(lines) + "\n"
