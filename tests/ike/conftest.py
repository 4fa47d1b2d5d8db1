"""Fixtures of the IKE tests: a strongSwan lab that is removed even when a test fails."""

from __future__ import annotations

import pytest

from .strongswan import Lab, strongswan_missing


@pytest.fixture
def lab():
    """Two namespaces and a place for charon; everything is removed afterwards."""
    why = strongswan_missing()
    if why:
        pytest.skip(why)
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()
