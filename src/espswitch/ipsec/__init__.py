"""IPsec ESP (RFC 4301/4303), sans-IO: security associations, transforms, anti-replay.

Nothing here opens a socket, reads a file or looks at the clock: packets and the current
time come in as arguments, protected packets, drop reasons and events come out.
"""

from espswitch.ipsec.errors import (
    DropReason,
    EspDrop,
    IpsecConfigError,
    IpsecError,
    LocalIpsecError,
    RemoteIpsecError,
    SaRefused,
)
from espswitch.ipsec.sa import (
    InboundSA,
    Lifetime,
    LifetimeEvent,
    OutboundSA,
    SaParams,
)
from espswitch.ipsec.sad import Sad
from espswitch.ipsec.transforms import TRANSFORM_NAMES, Transform, parse_transform

__all__ = [
    "TRANSFORM_NAMES",
    "DropReason",
    "EspDrop",
    "InboundSA",
    "IpsecConfigError",
    "IpsecError",
    "Lifetime",
    "LifetimeEvent",
    "LocalIpsecError",
    "OutboundSA",
    "RemoteIpsecError",
    "SaParams",
    "SaRefused",
    "Sad",
    "Transform",
    "parse_transform",
]
