"""The fast-path tests: skipped as a whole, with the reason, when the module is not built."""

from __future__ import annotations

import pytest

from espswitch.datapath import fast


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if fast.AVAILABLE:
        return
    skip = pytest.mark.skip(reason=fast.REASON)
    for item in items:
        # The fallback test runs precisely when the module is absent too.
        if "fastpath" in item.nodeid and "test_fallback" not in item.nodeid:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter) -> None:
    from .diff import PIPELINES, STATS

    if any(PIPELINES.values()):
        terminalreporter.write_line(
            "pipeline differential: " + ", ".join(f"{k}={v}" for k, v in PIPELINES.items())
            + " through the compiled and the Python path")

    if STATS["examples"]:
        terminalreporter.write_line(
            f"fastpath differential: {STATS['frames']} packets compared in "
            f"{STATS['examples']} scripts (hypothesis examples); lifetime events "
            f"{STATS['events']}; drops: " + ", ".join(
                f"{k}={v}" for k, v in STATS.items() if k not in ("examples", "frames", "events")))
