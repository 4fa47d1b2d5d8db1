"""The errors of the IKEv2 core.

As in h11 and ``espswitch.ipsec``: one base class, a *local* kind (our configuration, a
command that cannot run, a limit of ours) and a *remote* kind (something about a received
message). Internal code raises the local kind or `ProtocolError`; the single receive entry
point of the core re-raises what a received message caused as `RemoteIkeError`, so blame is
decided in one place. Errors never carry key material or message contents.
"""

from __future__ import annotations

__all__ = [
    "IkeConfigError",
    "IkeError",
    "LocalIkeError",
    "ProtocolError",
    "RemoteIkeError",
]


class IkeError(Exception):
    """Base class of every error the IKE core raises."""

    #: The RFC 7296 notify type to answer with when this error is about a request (0: none).
    notify: int = 0

    def __init__(self, msg: str, *, notify: int = 0, data: bytes = b"") -> None:
        super().__init__(msg)
        if notify:
            self.notify = notify
        #: Notification data to answer with (e.g. the unsupported payload type).
        self.data = data


class LocalIkeError(IkeError):
    """Our side: configuration, a command that cannot run, a state-table violation."""


class IkeConfigError(LocalIkeError, ValueError):
    """A bad configuration value (proposal, identity, key, traffic selector)."""


class ProtocolError(LocalIkeError):
    """A message does not fit the protocol; raised internally, re-raised as remote."""


class RemoteIkeError(IkeError):
    """A received message was malformed, unauthenticated or not acceptable."""
