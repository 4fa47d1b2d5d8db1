"""espswitch: a userspace virtual switch that protects VXLAN tunnels with IPsec ESP."""

__version__ = "0.1.0"
