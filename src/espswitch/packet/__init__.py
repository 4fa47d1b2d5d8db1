"""Wire formats of espswitch: sans-IO parsers and builders for Ethernet, ARP, IPv4, IPv6,
UDP, VXLAN, ICMP, ESP framing and pcap files.

Import the submodule you need (``from espswitch.packet.ipv4 import parse_ipv4``). Parsers
raise :class:`espswitch.packet.errors.PacketError` for malformed input and nothing else;
the hot path uses the exported offsets and ``struct.Struct`` constants directly.
"""
