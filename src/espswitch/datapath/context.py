"""What a port may use of the datapath: a narrow context instead of the whole `Datapath`.

A port sees the clock, the route and neighbour tables, its devices, the tunnel layer (to
send IPv4 and to register what it receives), the deferred receive queue, drop counters and
the rate-limited log; nothing else. Open vSwitch's netdevs see as little of dpif-netdev.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.datapath import Datapath
    from espswitch.datapath.ports import Port
    from espswitch.datapath.tunnel import NeighborCache, RouteTable
    from espswitch.datapath.tunnel_layer import TunnelLayer


class PortContext:
    """The datapath as a port sees it."""

    __slots__ = ("_dp", "count_drop", "defer_rx", "devices", "drop_log_due", "fast_changed",
                 "log_rl", "neigh", "receive", "routes", "tunnels")

    def __init__(self, dp: Datapath) -> None:
        self._dp = dp
        self.devices = dp.devices
        self.routes: RouteTable = dp.routes
        self.neigh: NeighborCache = dp.neigh
        self.tunnels: TunnelLayer = dp.tunnels
        self.defer_rx = dp.defer_rx
        self.receive = dp.receive
        self.count_drop = dp.count_drop
        self.log_rl = dp.log_rl
        self.drop_log_due = dp.drop_log_due
        self.fast_changed = dp.fast_changed

    @property
    def now(self) -> float:
        """The datapath's clock (monotonic seconds), as of the current batch."""
        return self._dp.now

    @property
    def fast_path(self) -> bool:
        """Whether new SAs go to the compiled fast path (`other_config:fast-path`)."""
        return self._dp.fast_path

    def port(self, name: str) -> Port | None:
        """The port called `name`, if any (a patch port looks for its peer)."""
        return self._dp.ports.get(name)

    def internal_port(self, dev: str) -> tuple[Bridge, Port] | None:
        """The bridge and internal port behind the kernel device `dev`, if it is one."""
        return self._dp.internal_port(dev)

    def mtus_changed(self) -> None:
        """A device's MTU changed (Datapath.mtus_changed)."""
        self._dp.mtus_changed()

    def pollables_changed(self) -> None:
        """A port's file descriptor came or went: the event loop must look again."""
        self._dp.fd_seq += 1
