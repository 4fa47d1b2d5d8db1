"""Compiled SAs: `OutboundSA` and `InboundSA` whose state and per-packet work are in C.

`CompiledOutboundSA` and `CompiledInboundSA` subclass the Python SAs of `espswitch.ipsec.sa`
and change two things:

- the per-packet entry points `encrypt` and `open` (so `decrypt`, `protect` and
  `unprotect` too) are the compiled core's `SaCore.seal` / `SaCore.open`;
- the per-packet state (sequence number, replay window, packet/byte/drop counters, the
  expired flag, the lifetime thresholds) is not kept in the Python object but in the
  core's C struct: every attribute the Python engine reads or writes for it is a property
  that forwards to the core. The Python SA's own code, the lifetime logic (`_crossed`,
  `expire`, `on_timer`, `take_events`), `counters()`, `lifetime_left()` and even its
  pure-Python per-packet methods (`_seal_aead`, `_open_aead`, ...) therefore work on the
  same one state as the compiled core and as `seal_batch` / `open_batch`, whichever
  path handles a packet.

The core hands up to the Python slow path exactly where the Python engine would: when a
packet crosses a lifetime threshold it calls the SA's own `_account_slow`, so the events,
the expiry and the next thresholds are the Python engine's, byte for byte.

Import this module only when `espswitch.datapath.fast.AVAILABLE` is true.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from espswitch.datapath.fast import _fastpath
from espswitch.ipsec.errors import DropReason
from espswitch.ipsec.replay import ReplayWindow
from espswitch.ipsec.sa import InboundSA, OutboundSA, SaParams

__all__ = ["CompiledInboundSA", "CompiledOutboundSA", "CompiledWindow"]


def _forward(name: str, doc: str) -> property:
    """A property that reads and writes the attribute `name` of the SA's core."""

    def get(self: _CoreBacked) -> object:
        return getattr(self._core, name)

    def put(self: _CoreBacked, value: object) -> None:
        setattr(self._core, name, value)

    return property(get, put, doc=doc)


class _DropsView:
    """The drop counters in the core, indexed by `DropReason` like the Python SA's list."""

    __slots__ = ("_core",)

    def __init__(self, core: _fastpath.SaCore) -> None:
        self._core = core

    def __getitem__(self, reason: int) -> int:
        return self._core.drop_count(int(reason))

    def __setitem__(self, reason: int, value: int) -> None:
        self._core.set_drop_count(int(reason), value)

    def __len__(self) -> int:
        return len(DropReason)

    def __iter__(self) -> Iterator[int]:
        return iter(self._core.drop_counts())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, list | _DropsView):
            return NotImplemented
        return list(self) == list(other)

    def __repr__(self) -> str:
        return repr(self._core.drop_counts())


class _BlocksView:
    """The replay window's 64-bit blocks in the core, as the Python window's list."""

    __slots__ = ("_core",)

    def __init__(self, core: _fastpath.SaCore) -> None:
        self._core = core

    def __getitem__(self, i: int) -> int:
        return self._core.win_block(i)

    def __setitem__(self, i: int, value: int) -> None:
        self._core.set_win_block(i, value)

    def __len__(self) -> int:
        return self._core.win_nblocks

    def __iter__(self) -> Iterator[int]:
        return iter(self._core.win_blocks())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, list | _BlocksView):
            return NotImplemented
        return list(self) == list(other)


class CompiledWindow:
    """The replay window of a `CompiledInboundSA`, in its core: the interface of
    `espswitch.ipsec.replay.ReplayWindow` (`top`, `size`, `esn`, `blocks`, `bmask`,
    `infer`, `check`, `update`), same semantics, one state."""

    __slots__ = ("_core",)

    def __init__(self, core: _fastpath.SaCore) -> None:
        self._core = core

    top = _forward("win_top", "The highest sequence number authenticated (or the start).")

    @property
    def size(self) -> int:
        """The window size in packets (0: the check is off)."""
        return self._core.win_size

    @property
    def esn(self) -> bool:
        """Whether extended sequence numbers are inferred."""
        return self._core.win_esn

    @property
    def bmask(self) -> int:
        """The ring's index mask (number of blocks - 1)."""
        return self._core.win_nblocks - 1

    @property
    def blocks(self) -> _BlocksView:
        """The ring of 64-bit blocks."""
        return _BlocksView(self._core)

    def infer(self, seq_low: int) -> int:
        """`ReplayWindow.infer`."""
        return self._core.win_infer(seq_low)

    def check(self, seq: int) -> DropReason | None:
        """`ReplayWindow.check`."""
        return self._core.win_check(seq)

    def update(self, seq: int) -> None:
        """`ReplayWindow.update`."""
        self._core.win_update(seq)

    def __repr__(self) -> str:
        return f"<CompiledWindow size={self.size} top={self.top}>"


class _CoreBacked:
    """The state `_SaBase` keeps per packet, forwarded to the core (see the module doc)."""

    __slots__ = ()
    _core: _fastpath.SaCore

    packets = _forward("packets", "Packets protected or accepted.")
    bytes = _forward("bytes", "Payload bytes protected or accepted.")
    expired = _forward("expired", "Past the hard lifetime, or deleted.")
    _bytes_check = _forward("bytes_check", "The next byte count at which to account.")

    @property
    def drops(self) -> _DropsView:
        """Drop counters by `DropReason`."""
        return _DropsView(self._core)

    @drops.setter
    def drops(self, values: list[int]) -> None:
        for reason, value in enumerate(values):
            self._core.set_drop_count(reason, value)

    @property
    def compiled(self) -> bool:
        """True: this SA's packets go through the compiled core."""
        return True


class CompiledOutboundSA(_CoreBacked, OutboundSA):
    """`OutboundSA` with the compiled core: same inputs, same bytes, same counters.

    `iv_mask` sets the AEAD IV mask (IV = sequence number XOR mask) instead of a random
    one, for differential tests that compare the bytes of two SAs.
    """

    __slots__ = ("__weakref__", "_core")

    seq = _forward("seq", "The last sequence number sent.")
    _seq_limit = _forward("seq_limit", "The highest sequence number that may be sent.")
    _check_seq = _forward("check_seq", "Where a packet lifetime is crossed, or -1.")
    _iv_mask = _forward("iv_mask", "The AEAD IV mask.")

    def __init__(self, params: SaParams, *, now: float = 0.0, seq_start: int = 1,
                 iv_source: Callable[[int], bytes] | None = None,
                 iv_mask: int | None = None) -> None:
        # The core first: the Python constructor then initialises the state through it.
        self._core = _fastpath.SaCore(params.transform, params.keymat, spi=params.spi,
                                      outbound=True, owner=self, iv_source=iv_source)
        super().__init__(params, now=now, seq_start=seq_start, iv_source=iv_source)
        if iv_mask is not None:
            self._iv_mask = iv_mask
        self.encrypt = self._core.seal


class CompiledInboundSA(_CoreBacked, InboundSA):
    """`InboundSA` with the compiled core: same inputs, same results, same counters."""

    __slots__ = ("__weakref__", "_core")

    _check_packets = _forward("check_packets", "The packet count at which to account.")

    @property
    def window(self) -> CompiledWindow:
        """The replay window, in the core."""
        return CompiledWindow(self._core)

    @window.setter
    def window(self, window: ReplayWindow) -> None:
        self._core.load_window(window)

    def __init__(self, params: SaParams, *, now: float = 0.0, esn_high: int = 0) -> None:
        self._core = _fastpath.SaCore(params.transform, params.keymat, spi=params.spi,
                                      outbound=False, owner=self)
        super().__init__(params, now=now, esn_high=esn_high)
        self.open = self._core.open
