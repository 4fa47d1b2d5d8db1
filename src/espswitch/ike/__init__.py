"""IKEv2 (RFC 7296) for espswitch: a sans-IO protocol core and its socket driver.

The core (`IkeCore`) takes datagrams, commands and the time, and returns datagrams to send,
timers and events; `ChildSaInstalled` events carry what `espswitch.ipsec` needs to build
the ESP SAs. `espswitch.ike.driver` runs a core on UDP ports 500 and 4500 (espswitchd's
poll loop, or asyncio).

Which module owns what (to add an exchange or a notify, open the one file of its exchange):

- `core.py`: `IkeCore`, the one entry point: commands, timers, routing of what arrives to
  its exchange, and the blame (a `ProtocolError` from anywhere below is the peer's).
- `sa_init.py`: IKE_SA_INIT, both roles: proposals, KE, cookies, NAT detection, half-open
  limits, differing unprotected responses.
- `ike_auth.py`: IKE_AUTH, both roles: identities, certificates and AUTH, INITIAL_CONTACT,
  the first CHILD_SA, crossing initiations.
- `create_child.py`: CREATE_CHILD_SA, both roles: CHILD_SAs, traffic selectors, keying
  material, CHILD_SA and IKE SA rekeys and their collisions, expiry.
- `informational.py`: INFORMATIONAL, both roles: deletes and liveness checks (a MOBIKE
  address update would go here).
- `window.py`: once for every exchange: message IDs, the outstanding request and its
  retransmission, the request queue, resent responses, encoding, fragments (`fragment.py`).
- `sas.py`: the shared SA store (`IkeSa`, `ChildSa`, `SaStore`); `context.py`: what the
  exchanges share (configuration, outputs, IKE SA up/closed, CHILD_SA installed/removed).
- `state.py`: the IKE SA and CHILD_SA state tables, the only way either changes state.
- Below them: `message.py` (wire format), `crypto.py`, `auth.py`/`chain.py`/`identity.py`
  (authentication), `proposals.py`, `ts.py`, `config.py` (peers), `options.py` (the
  vxlanipsec options of IKE keying), `events.py`, `errors.py`, `consts.py`.
- `driver.py`: the only module with sockets or a clock.
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
