"""IKEv2 (RFC 7296) for espswitch: a sans-IO protocol core and a small asyncio driver.

The core (`IkeCore`) takes datagrams, commands and the time, and returns datagrams to send,
timers and events; `ChildSaInstalled` events carry what `espswitch.ipsec` needs to build
the ESP SAs. `espswitch.ike.driver` runs a core on UDP ports 500 and 4500.
"""

from espswitch.ike.auth import Credentials, Identity
from espswitch.ike.config import ChildConfig, CoreSettings, PeerConfig
from espswitch.ike.core import ChildInfo, IkeCore, IkeSaInfo
from espswitch.ike.errors import (
    IkeConfigError,
    IkeError,
    LocalIkeError,
    ProtocolError,
    RemoteIkeError,
)
from espswitch.ike.events import (
    ChildSaDeleted,
    ChildSaExpired,
    ChildSaInstalled,
    Datagram,
    Event,
    IkeSaDown,
    IkeSaUp,
)

__all__ = [
    "ChildConfig",
    "ChildInfo",
    "ChildSaDeleted",
    "ChildSaExpired",
    "ChildSaInstalled",
    "CoreSettings",
    "Credentials",
    "Datagram",
    "Event",
    "Identity",
    "IkeConfigError",
    "IkeCore",
    "IkeError",
    "IkeSaDown",
    "IkeSaInfo",
    "IkeSaUp",
    "LocalIkeError",
    "PeerConfig",
    "ProtocolError",
    "RemoteIkeError",
]
