"""The compiled fast path (issue 10), and the pure-Python fallback when it is not built.

One compiled module, `_fastpath` (Cython over OpenSSL's libcrypto EVP interface), holds
the per-packet ESP work of the common case. Python owns everything else: it installs SAs,
keeps their lifetimes and reads their counters. When the module is not built (no
compiler, headers or Cython at install time) or cannot load, `AVAILABLE` is False,
`REASON` says why, and every function here answers with the Python engine instead:
the switch runs, slower.

- `make_outbound_sa` / `make_inbound_sa`: the SA for `SaParams`, compiled when possible
  (`CompiledOutboundSA` / `CompiledInboundSA`, subclasses of the Python SAs), else the
  Python `OutboundSA` / `InboundSA`. Same constructor inputs, same outputs.
- `seal_batch` / `open_batch`: a list of packets through one SA; the compiled SAs run the
  whole list in C without the GIL, the Python SAs one packet at a time.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

from espswitch.ipsec.errors import DropReason, SaRefused
from espswitch.ipsec.sa import InboundSA, OutboundSA, SaParams
from espswitch.ipsec.transforms import Transform

try:
    # import_module, not "from . import": its error names the missing module plainly.
    _fastpath = importlib.import_module(__name__ + "._fastpath")
except ImportError as exc:  # not built, or built against something this host lacks
    _fastpath = None
    AVAILABLE = False
    REASON = f"compiled fast path not available ({exc}): the Python engine is used"
else:
    AVAILABLE, REASON = True, "compiled fast path available"
    _pyx = Path(__file__).with_name("_fastpath.pyx")
    _built_from = getattr(_fastpath, "SOURCE_SHA256", "")
    if _built_from and _pyx.exists() and (
            hashlib.sha256(_pyx.read_bytes()).hexdigest() != _built_from):
        # Edited since it was built: a stale module would be tested and used in its place.
        _fastpath = None
        AVAILABLE = False
        REASON = ("compiled fast path is older than _fastpath.pyx (rebuild: python3 setup.py "
                  "build_ext --inplace): the Python engine is used")

if AVAILABLE:
    from espswitch.datapath.fast.sa import CompiledInboundSA, CompiledOutboundSA
else:
    CompiledInboundSA = CompiledOutboundSA = None  # type: ignore[assignment,misc]

__all__ = [
    "AVAILABLE",
    "REASON",
    "is_compiled",
    "make_inbound_sa",
    "make_outbound_sa",
    "open_batch",
    "seal_batch",
    "supports",
]

Buffer = bytes | bytearray | memoryview


def supports(transform: Transform) -> bool:
    """Whether the compiled core is built and implements `transform`."""
    return AVAILABLE and _fastpath.supports(transform)


def is_compiled(sa: OutboundSA | InboundSA) -> bool:
    """Whether `sa`'s packets go through the compiled core."""
    return getattr(sa, "compiled", False)


def make_outbound_sa(params: SaParams, *, now: float = 0.0, seq_start: int = 1,
                     iv_source: Callable[[int], bytes] | None = None,
                     iv_mask: int | None = None, fast: bool = True) -> OutboundSA:
    """An outbound SA for `params`: compiled when `fast` and possible, else Python.

    `iv_mask` (compiled or not) replaces the random AEAD IV mask: for tests only.
    """
    if fast and supports(params.transform):
        return CompiledOutboundSA(params, now=now, seq_start=seq_start, iv_source=iv_source,
                                  iv_mask=iv_mask)
    sa = OutboundSA(params, now=now, seq_start=seq_start, iv_source=iv_source)
    if iv_mask is not None:
        sa._iv_mask = iv_mask
    return sa


def make_inbound_sa(params: SaParams, *, now: float = 0.0, esn_high: int = 0,
                    fast: bool = True) -> InboundSA:
    """An inbound SA for `params`: compiled when `fast` and possible, else Python."""
    if fast and supports(params.transform):
        return CompiledInboundSA(params, now=now, esn_high=esn_high)
    return InboundSA(params, now=now, esn_high=esn_high)


def seal_batch(sa: OutboundSA, payloads: Sequence[Buffer],
               next_header: int) -> list[bytes | DropReason]:
    """Seal each payload with `sa`: the ESP packet, or the DropReason when the SA refused
    it (counted, as `encrypt` raising SaRefused)."""
    if is_compiled(sa):
        return _fastpath.seal_batch(sa, payloads, next_header)
    out: list[bytes | DropReason] = []
    encrypt = sa.encrypt
    for payload in payloads:
        try:
            out.append(encrypt(payload, next_header))
        except SaRefused as refused:
            out.append(refused.reason)
    return out


def open_batch(sa: InboundSA,
               packets: Sequence[Buffer]) -> list[tuple[int, bytes] | DropReason]:
    """Open each ESP packet with `sa`: `(next_header, payload)` or the DropReason."""
    if is_compiled(sa):
        return _fastpath.open_batch(sa, packets)
    return [sa.open(esp) for esp in packets]
