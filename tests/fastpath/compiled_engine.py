"""A pytest plugin that runs any test on the compiled SAs: it replaces `OutboundSA` and
`InboundSA` in `espswitch.ipsec` (and `espswitch.ipsec.sa`) with the compiled subclasses
before the tests import them, for the transforms the core supports.

    PYTHONPATH=src python3 -m pytest -p tests.fastpath.compiled_engine tests/ipsec tests/datapath

This checks the compiled SAs against every existing expectation on the Python engine; it
is not needed once the datapath makes its SAs with espswitch.datapath.fast's factory.
"""

from __future__ import annotations

import espswitch.ipsec
import espswitch.ipsec.sa
from espswitch.datapath import fast

if fast.AVAILABLE:
    from espswitch.datapath.fast.sa import CompiledInboundSA, CompiledOutboundSA

    _PyOut, _PyIn = espswitch.ipsec.sa.OutboundSA, espswitch.ipsec.sa.InboundSA

    MADE = {"compiled": 0, "python": 0}

    def _outbound(params, **kw):
        cls = CompiledOutboundSA if fast.supports(params.transform) else _PyOut
        MADE["compiled" if cls is CompiledOutboundSA else "python"] += 1
        return cls(params, **kw)

    def _inbound(params, **kw):
        cls = CompiledInboundSA if fast.supports(params.transform) else _PyIn
        MADE["compiled" if cls is CompiledInboundSA else "python"] += 1
        return cls(params, **kw)

    def pytest_terminal_summary(terminalreporter) -> None:
        terminalreporter.write_line(
            f"compiled_engine: {MADE['compiled']} compiled SAs and {MADE['python']} Python "
            "SAs made through espswitch.ipsec")

    class _Meta(type):
        """isinstance() and the class attributes still answer as the Python class."""

        def __instancecheck__(cls, obj: object) -> bool:
            return isinstance(obj, cls._base)

        def __getattr__(cls, name: str) -> object:
            return getattr(cls._base, name)

    class OutboundSA(metaclass=_Meta):
        _base = _PyOut

        def __new__(cls, params, **kw):
            return _outbound(params, **kw)

    class InboundSA(metaclass=_Meta):
        _base = _PyIn

        def __new__(cls, params, **kw):
            return _inbound(params, **kw)

    for module in (espswitch.ipsec, espswitch.ipsec.sa):
        module.OutboundSA = OutboundSA
        module.InboundSA = InboundSA
