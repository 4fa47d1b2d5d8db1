"""The anti-replay window of RFC 4303 §3.4.3, with ESN inference from Appendix A.

The window is a ring of bits (RFC 6479): 64-bit blocks in a list, a sequence number's bit
at `seq mod ring_bits`; moving the top clears only the blocks that came into view, so the
work per packet does not grow with the window size.
"""

from __future__ import annotations

from espswitch.ipsec.errors import DropReason, IpsecConfigError

MAX_WINDOW = 1 << 20
"""The largest window accepted: 1,048,576 packets."""

# With the check off the receiver still has to guess the ESN high half; a half-space
# window makes it pick the epoch closest to the highest sequence number seen.
_ESN_GUESS_WINDOW = 1 << 31

OK = None
_REPLAYED = DropReason.REPLAYED
_TOO_OLD = DropReason.TOO_OLD


class ReplayWindow:
    """Which sequence numbers at or below the highest authenticated one were received.

    `check` runs before the ICV is verified and changes nothing; `update` runs only after
    a packet authenticated (RFC 4303 §3.4.3). Size 0 turns the check off.
    """

    __slots__ = ("_nblocks", "blocks", "bmask", "esn", "size", "top")

    def __init__(self, size: int = 1024, *, esn: bool = False, initial_high: int = 0) -> None:
        if not isinstance(size, int) or not 0 <= size <= MAX_WINDOW:
            raise IpsecConfigError(f"replay window must be 0 to {MAX_WINDOW} packets, got {size!r}")
        if not 0 <= initial_high < (1 << 32) or (initial_high and not esn):
            raise IpsecConfigError("initial ESN high half must be 0 to 2^32-1, and needs ESN")
        nblocks = 2
        while (nblocks - 1) * 64 < size:  # one spare block: a full window fits any alignment
            nblocks <<= 1
        self._nblocks = nblocks
        self.bmask = nblocks - 1
        self.blocks = [0] * nblocks
        self.size = size
        self.esn = esn
        # The state is as if every number below the first window had been received, so
        # the first packets infer the high half `initial_high` whatever their low half.
        self.top = (initial_high << 32) | ((size or _ESN_GUESS_WINDOW) - 1) if esn else 0
        if initial_high == 0:
            # Sequence number 0 is never sent (RFC 4303 §2.2): treat it as already seen.
            self.blocks[0] = 1

    def infer(self, seq_low: int) -> int:
        """Return the full sequence number for a received low half (RFC 4303 Appendix A).

        Without ESN this is the low half itself. May return -1 when the guess falls before
        sequence number 0; `check` then reports it too old.
        """
        if not self.esn:
            return seq_low
        top = self.top
        th, tl = top >> 32, top & 0xFFFFFFFF
        w = self.size or _ESN_GUESS_WINDOW
        if tl >= w - 1:
            sh = th if seq_low >= tl - w + 1 else th + 1
        else:
            sh = th - 1 if seq_low >= (tl - w + 1) & 0xFFFFFFFF else th
        if sh > 0xFFFFFFFF:
            return -1
        return (sh << 32) | seq_low if sh >= 0 else -1

    def check(self, seq: int) -> DropReason | None:
        """Return None when `seq` may be new, else the reason it must be dropped."""
        top = self.top
        if seq > top:
            return OK
        if seq < 0:
            return _TOO_OLD
        size = self.size
        if not size:
            return OK
        if top - seq >= size:
            return _TOO_OLD
        if self.blocks[(seq >> 6) & self.bmask] >> (seq & 63) & 1:
            return _REPLAYED
        return OK

    def update(self, seq: int) -> None:
        """Record an authenticated `seq`, moving the window forward when it is the newest."""
        top = self.top
        blocks = self.blocks
        if seq > top:
            gap = (seq >> 6) - (top >> 6)
            if gap:
                if gap >= self._nblocks:
                    blocks[:] = [0] * self._nblocks
                else:
                    mask = self.bmask
                    for b in range((top >> 6) + 1, (seq >> 6) + 1):
                        blocks[b & mask] = 0
            self.top = seq
        blocks[(seq >> 6) & self.bmask] |= 1 << (seq & 63)
