"""Port types: classes registered under their `Interface.type` string.

A port class gets `(context, bridge, name, options)` (a `PortContext`: what a port may use of
the datapath) and opens whatever it needs in
`open()`, raising `PortError` with one sentence when the configuration cannot work.
Operations a type lacks answer "not supported" (`NotSupported`), as netdev classes do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from espswitch.datapath.counters import Counters
from espswitch.datapath.errors import PortError
from espswitch.datapath.gso import complete as gso_complete

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.context import PortContext
    from espswitch.datapath.devices import SendResult

PORT_TYPES: dict[str, type[Port]] = {}

# What `Interface.mtu_request` may ask of a device: RFC 791's smallest datagram to the
# largest IP packet (the schema only says at least 1; the device may refuse more).
MIN_MTU, MAX_MTU = 68, 65535


def register_port_type(type_name: str) -> Callable[[type[Port]], type[Port]]:
    """Class decorator: make `cls` the implementation of `Interface.type == type_name`."""

    def deco(cls: type[Port]) -> type[Port]:
        cls.TYPE = type_name
        PORT_TYPES[type_name] = cls
        return cls

    return deco


def port_class(type_name: str) -> type[Port]:
    """Return the class for `type_name` ("" means "system"), or raise PortError."""
    cls = PORT_TYPES.get(type_name or "system")
    if cls is None:
        known = ", ".join(sorted(PORT_TYPES))
        raise PortError(f"unknown interface type '{type_name}' (known types: {known})")
    return cls


class NotSupported(Exception):
    """An optional operation that this port type does not have."""


class Port:
    """One interface of a bridge (espswitch ports have exactly one interface).

    Subclasses override `open`, `close`, `send` and, for ports with a file descriptor,
    `fileno`/`receive`.  `send` owns the batch it is given, even when it fails.
    """

    TYPE: ClassVar[str] = ""
    COUNTERS: ClassVar[type[Counters]] = Counters
    #: options this type understands; anything else is a configuration error
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def variant(cls, options: Mapping[str, str]) -> type[Port]:
        """The class that implements this type with these options (itself, unless the
        options make it another kind of port: IPsec options on a `gre` tunnel, say);
        raises PortError for options no variant takes."""
        return cls

    def __init__(self, ctx: PortContext, bridge: Bridge, name: str,
                 options: Mapping[str, str]) -> None:
        self.ctx = ctx
        self.bridge = bridge
        self.name = name
        self.options = dict(options)
        self.stats = self.COUNTERS()
        self.ofport = -1
        self.tag: int | None = None
        self.trunks: frozenset[int] | None = None
        unknown = sorted(set(self.options) - self.OPTIONS)
        if unknown:
            raise PortError(
                f"{self.TYPE or 'system'} interface {name} does not take option"
                f"{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
            )

    # --- lifecycle -----------------------------------------------------------------------
    def open(self) -> None:
        """Acquire devices; raise PortError with a clear sentence on failure."""

    def close(self) -> None:
        """Release everything; cannot fail."""

    def run(self, now: float) -> None:
        """Housekeeping (timers, lifetimes), called about every 100 ms."""

    # --- I/O -----------------------------------------------------------------------------
    def fileno(self) -> int | None:
        """The file descriptor to poll, or None for ports without one (patch, tunnels)."""
        return None

    #: whether what `receive` returns starts with a virtio-net header (see `complete`)
    vnet = False

    def receive(self, limit: int = 32) -> list[bytes]:
        raise NotSupported

    def complete(self, reads: list[bytes]) -> list[bytes]:
        """The frames reads with a virtio-net header stand for (only ports with `vnet`)."""
        raise NotSupported

    def send(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    # --- state for the database ----------------------------------------------------------
    def status(self) -> dict[str, str]:
        """Keys for `Interface.status`; subclasses add their own."""
        return {}

    def statistics(self) -> dict[str, int]:
        return dict(self.stats)

    def mac_in_use(self) -> str | None:
        return None

    def link_state(self) -> str:
        return "up"

    #: Interface.mtu_request (None: the device keeps the MTU it has)
    mtu_request: int | None = None
    #: why the device did not take `mtu_request` ("" when it did), in Interface.status
    mtu_error = ""

    def set_mtu_request(self, mtu: int | None) -> None:
        """Apply `Interface.mtu_request`. Ports without a device of their own (tunnels,
        patch ports) keep it and do nothing, as Open vSwitch's tunnel ports do."""
        self.mtu_request = mtu

    def mtu(self) -> int | None:
        """For `Interface.mtu`: the device's MTU, None for ports without a device."""
        return None

    def describe(self) -> str:
        """The type and salient options, for dpif/show."""
        if not self.options:
            return self.TYPE
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.TYPE}: {opts}"

    # --- VLAN membership -------------------------------------------------------------------
    def set_vlan(self, tag: int | None, trunks: frozenset[int] | None) -> None:
        self.tag = tag
        self.trunks = trunks or None
        self.ctx.fast_changed()


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class DevicePort(Port):
    """A port backed by one Linux device."""

    dev = None

    def fileno(self) -> int | None:
        return self.dev.fileno() if self.dev is not None else None

    def receive(self, limit: int = 32) -> list[bytes]:
        return self.dev.recv_batch(limit)

    def send(self, frames: list[bytes]) -> None:
        self.count_sent(sum(map(len, frames)), self.dev.send(frames))

    def count_sent(self, nbytes: int, result: SendResult) -> None:
        """Count what the device's `send` did with frames of `nbytes` bytes in all (also
        for the compiled pipelines, which write to the device themselves)."""
        sent, dropped, too_big = result
        st = self.stats
        st["tx_packets"] += sent
        if not dropped and not too_big:
            st["tx_bytes"] += nbytes
            return
        st["tx_bytes"] += nbytes - sum(dropped) - sum(too_big)
        if dropped:
            st.drop("tx_queue_full", len(dropped))
        if too_big:
            st.drop("tx_too_big", len(too_big))

    def close(self) -> None:
        if self.dev is not None:
            self.dev.close()
            self.dev = None

    def set_mtu_request(self, mtu: int | None) -> None:
        self.mtu_request = mtu
        self.apply_mtu()

    def apply_mtu(self) -> None:
        """Give the device the requested MTU; a refusal is kept in `mtu_error` (the port
        goes on with the MTU it has). Tunnels then size themselves again."""
        mtu, self.mtu_error = self.mtu_request, ""
        if self.dev is None:
            return
        if mtu is None:  # cleared: tunnels size their VM ports again
            self.ctx.mtus_changed()
            return
        if not MIN_MTU <= mtu <= MAX_MTU:
            self.mtu_error = f"mtu_request {mtu} is out of range ({MIN_MTU} to {MAX_MTU})"
        else:
            err = self.dev.set_mtu(mtu)
            if err:
                self.mtu_error = f"the device refused MTU {mtu}: {err}"
        if self.mtu_error:
            self.ctx.log_rl(f"{self.name}: {self.mtu_error}")
        self.ctx.mtus_changed()

    def mtu(self) -> int | None:
        return self.dev.mtu() if self.dev is not None else None

    def status(self) -> dict[str, str]:
        return {"mtu_error": self.mtu_error} if self.mtu_error else {}

    def mac_in_use(self) -> str | None:
        return format_mac(self.dev.mac) if self.dev is not None else None

    def link_state(self) -> str:
        return self.dev.link_state() if self.dev is not None else "down"

    @property
    def mac(self) -> bytes:
        return self.dev.mac if self.dev is not None else b"\0" * 6


@register_port_type("tap")
class TapPort(DevicePort):
    """A TAP device created for a VM.

    Persistent, so that a VM (namespace) keeps its device while espswitchd restarts after
    a crash; a port that is deleted, or a daemon that exits, removes the device.
    """

    PERSIST = True
    #: TSO and checksum offload from the VM (datapath/gso.py): reads of up to 64 KiB
    OFFLOAD = True

    def open(self) -> None:
        self.dev = self.ctx.devices.open_tap(self.name, persist=self.PERSIST,
                                             offload=self.OFFLOAD)
        self.vnet = getattr(self.dev, "vnet", False)

    def receive(self, limit: int = 32) -> list[bytes]:
        if self.vnet:
            return self.dev.recv_raw(limit)
        return self.dev.recv_batch(limit)

    def complete(self, reads: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for raw in reads:
            frames = gso_complete(raw)
            if frames:
                out.extend(frames)
            else:
                st = self.stats
                st["rx_packets"] += 1
                st["rx_bytes"] += len(raw)
                st.drop("rx_malformed")
        return out

    def run(self, now: float) -> None:
        if self.dev is not None:
            self.ctx.devices.track_tap(self.dev, now)

    def close(self) -> None:
        super().close()
        self.ctx.devices.forget_tap(self.name)


@register_port_type("internal")
class InternalPort(TapPort):
    """The bridge-local port: a TAP device that the kernel's stack uses.

    Persistent like `tap`, so that its addresses survive a crash of the daemon, as OVS's do.
    No offloads: the host's own traffic (IKE, routed packets) stays in MTU-sized frames.
    """

    OFFLOAD = False
    _seen_mtu: int | None = None
    _next_mtu_check = 0.0

    def run(self, now: float) -> None:
        super().run(now)
        # Tunnels take their MTU from this device: follow a change made by hand too
        # (`ip link set br-phy mtu 9000`), once a second.
        if now >= self._next_mtu_check and self.dev is not None:
            self._next_mtu_check = now + 1.0
            mtu = self.dev.mtu()
            if mtu != self._seen_mtu:
                if self._seen_mtu is not None:
                    self.ctx.mtus_changed()
                self._seen_mtu = mtu


@register_port_type("system")
class SystemPort(DevicePort):
    """An existing Linux device on an AF_PACKET socket: the "physical NIC".

    If the device goes away, the port stays (link down, its frames counted as dropped)
    and attaches again when a device of that name comes back.
    """

    CHECK_INTERVAL = 1.0
    #: receive batches left in the device's ring (set by the fast path's tables for the
    #: NIC ports whose batches it runs: see Datapath.receive)
    zero_copy = False

    def open(self) -> None:
        self.dev = self.ctx.devices.open_system(self.name)
        self._next_check = 0.0

    def receive(self, limit: int = 32) -> Sequence[bytes]:
        """Up to `limit` frames: with `zero_copy`, a RingBatch left in the device's ring
        (Datapath.receive releases it), else a list."""
        if self.zero_copy:
            recv_ring = getattr(self.dev, "recv_ring", None)
            batch = recv_ring(limit) if recv_ring is not None else None
            if batch is not None:
                return batch
        return super().receive(limit)

    def run(self, now: float) -> None:
        if now < self._next_check:
            return
        self._next_check = now + self.CHECK_INTERVAL
        devices = self.ctx.devices
        idx = devices.ifindex(self.name)
        if self.dev is not None and self.dev.ifindex == idx:
            self._fit_ring()  # its MTU may have been raised by hand (ip link set mtu)
            return
        if self.dev is not None:
            self._detach()
            self.ctx.log_rl(f"{self.name}: device disappeared, waiting for it to return")
        if idx is not None and self._attach() is None:
            self.bridge.flush_port(self)
            self.ctx.log_rl(f"{self.name}: device is back, attached again")
            if self.mtu_request is not None:
                self.apply_mtu()

    def _detach(self) -> None:
        self.dev.close()
        self.dev = None
        self.ctx.pollables_changed()

    def _attach(self) -> PortError | None:
        """Open the device again; why it cannot be (run() retries while it cannot)."""
        try:
            self.dev = self.ctx.devices.open_system(self.name)
        except PortError as e:
            return e
        self.ctx.pollables_changed()
        return None

    def apply_mtu(self) -> None:
        super().apply_mtu()
        self._fit_ring()

    def _fit_ring(self) -> None:
        """Open the device again if its MTU outgrew the receive ring's slots: the kernel
        would cut every bigger frame to the slot, and a cut frame is dropped."""
        dev = self.dev
        mtu = dev.mtu() if dev is not None else None
        if mtu is None or dev.fits(mtu):
            return
        self._detach()
        err = self._attach()
        self.ctx.log_rl(f"{self.name}: cannot attach again for MTU {mtu}: {err}" if err else
                        f"{self.name}: attached again for its MTU of {mtu}")

    def send(self, frames: list[bytes]) -> None:
        if self.dev is None:
            self.stats.drop("tx_link_down", len(frames))
            return
        super().send(frames)


@register_port_type("patch")
class PatchPort(Port):
    """`options:peer=<interface>` joins two bridges; frames cross within the process."""

    OPTIONS = frozenset({"peer"})

    def __init__(self, ctx, bridge, name, options) -> None:
        super().__init__(ctx, bridge, name, options)
        peer = self.options.get("peer")
        if not peer:
            raise PortError(f"patch interface {name} needs options:peer")
        if peer == name:
            raise PortError(f"patch interface {name} cannot be its own peer")
        self.peer_name = peer

    def peer(self) -> PatchPort | None:
        p = self.ctx.port(self.peer_name)
        if isinstance(p, PatchPort) and p.peer_name == self.name:
            return p
        return None

    def send(self, frames: list[bytes]) -> None:
        peer = self.peer()
        st = self.stats
        if peer is None:
            st.drop("tx_no_route", len(frames))
            return
        n = len(frames)
        nbytes = sum(map(len, frames))
        st["tx_packets"] += n
        st["tx_bytes"] += nbytes
        self.ctx.receive(peer, frames)

    def status(self) -> dict[str, str]:
        return {"peer": self.peer_name if self.peer() else f"{self.peer_name} (missing)"}

    def link_state(self) -> str:
        return "up" if self.peer() else "down"
