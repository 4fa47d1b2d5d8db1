"""The userspace datapath: bridges, ports and native tunnels over batches of frames.

Never imports `espswitch.vswitchd` or `ovs`; the control plane drives it through
`Datapath.add_bridge/add_port/del_port/...` and the event loop in `loop.py`.
"""

from espswitch.datapath.bridge import Bridge
from espswitch.datapath.counters import Counters
from espswitch.datapath.datapath import Datapath
from espswitch.datapath.errors import PortError
from espswitch.datapath.ports import PORT_TYPES, Port, register_port_type
from espswitch.datapath.tunnel_layer import TunnelLayer
from espswitch.datapath.tunnel_port import TunnelPort, VxlanIpsecPort, VxlanPort

__all__ = [
    "PORT_TYPES",
    "Bridge",
    "Counters",
    "Datapath",
    "Port",
    "PortError",
    "TunnelLayer",
    "TunnelPort",
    "VxlanIpsecPort",
    "VxlanPort",
    "register_port_type",
]
