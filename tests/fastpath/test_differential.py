"""Differential tests (issue 10): the compiled SAs against the Python engine, packet by packet.

Hypothesis draws the SA (every transform, with and without ESN, both modes, replay windows
from 0 to 2^20, lifetimes, first sequence numbers near the 32-bit and 64-bit ends) and a
seed; the seed drives a script of hundreds of packets (diff.py). Each test's example count
is fixed here, not by the profile, so the suite compares at least 100,000 packets per run
in CI and on a developer's machine alike (the count is printed in the terminal summary).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espswitch.ipsec import Lifetime

from .diff import TRANSFORMS, Config, run_script

WINDOWS = st.one_of(st.sampled_from((0, 1, 2, 32, 63, 64, 65, 128, 1024, 1 << 20)),
                    st.integers(0, 1 << 20))


@st.composite
def lifetimes(draw: st.DrawFn) -> tuple[Lifetime, Lifetime]:
    def one(scale: int) -> Lifetime:
        return Lifetime(
            packets=draw(st.one_of(st.none(), st.integers(1, 3 * scale))),
            bytes=draw(st.one_of(st.none(), st.integers(1, 3000 * scale))),
            seconds=draw(st.one_of(st.none(), st.floats(1.0, 200.0))))
    if draw(st.integers(0, 3)):  # three in four scripts: no lifetime, the SA lives on
        return Lifetime(), Lifetime()
    return one(100), one(200)


@st.composite
def configs(draw: st.DrawFn, ops: int) -> Config:
    esn = draw(st.booleans())
    top = (1 << 64) if esn else (1 << 32)
    seq_start = draw(st.one_of(
        st.just(1), st.integers(1, 5000),
        st.integers((1 << 32) - 300, (1 << 32) - 1),           # 32-bit end: wrap / exhaustion
        st.integers(top - 300, top - 1),                        # the end of the space
        st.integers(1, top - 1)))
    soft, hard = draw(lifetimes())
    return Config(
        transform=draw(st.sampled_from(TRANSFORMS)), esn=esn,
        mode=draw(st.sampled_from(("transport", "tunnel"))), window=draw(WINDOWS),
        seq_start=seq_start, soft=soft, hard=hard, aead_iv_source=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32)), ops=ops)


@settings(max_examples=360, deadline=None, suppress_health_check=list(HealthCheck))
@given(configs(ops=300))
def test_compiled_sa_matches_the_python_engine(cfg: Config) -> None:
    run_script(cfg)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(configs(ops=40), st.sampled_from(TRANSFORMS))
def test_short_scripts_every_transform(cfg: Config, transform: str) -> None:
    # Many short scripts: more SA set-ups, first packets and windows right at their start.
    cfg.transform = transform
    run_script(cfg)
