"""Per-interface counters: a dict of named integers that subclasses extend."""

from __future__ import annotations

from typing import ClassVar


class Counters(dict):
    """The counters of one interface, written to `Interface.statistics`.

    A subclass adds its own names by extending `NAMES` (for example a `vxlanipsec` port adds
    `esp_auth_failures`); every name starts at zero, so hot paths can do
    `stats["rx_packets"] += n` without a lookup miss.  `DROP_CAUSES` maps each cause-specific
    drop counter to the generic `rx_dropped`/`tx_dropped` it is also added to by `drop()`.
    """

    NAMES: ClassVar[tuple[str, ...]] = (
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "rx_dropped",
        "tx_dropped",
        "rx_errors",
        "tx_errors",
        # Drops by cause; each is also counted in rx_dropped or tx_dropped.
        "rx_malformed",
        "rx_vlan_drops",
        "rx_unknown_tunnel",
        "tx_no_route",
        "tx_neigh_drops",
        "tx_queue_full",
        "tx_too_big",
        "tx_link_down",
    )
    DROP_CAUSES: ClassVar[dict[str, str]] = {
        "rx_malformed": "rx_dropped",
        "rx_vlan_drops": "rx_dropped",
        "rx_unknown_tunnel": "rx_dropped",
        "tx_no_route": "tx_dropped",
        "tx_neigh_drops": "tx_dropped",
        "tx_queue_full": "tx_dropped",
        "tx_too_big": "tx_errors",
        "tx_link_down": "tx_dropped",
    }

    def __init__(self) -> None:
        super().__init__((name, 0) for name in self.NAMES)

    def drop(self, cause: str, n: int = 1) -> None:
        """Count `n` frames dropped for `cause` (and in the generic counter it belongs to)."""
        self[cause] = self.get(cause, 0) + n
        generic = self.DROP_CAUSES.get(cause)
        if generic is not None:
            self[generic] += n
