"""`espswitch esp decrypt|encrypt`: offline ESP tools for pcap captures.

`decrypt` rewrites every ESP packet of one SPI (raw ESP, or UDP-encapsulated on port 4500
per RFC 3948) as the packet it protected and reports, per packet, what failed; `encrypt`
does the reverse. Both use the datapath's ESP engine (`espswitch.ipsec`), nothing else.
"""

from __future__ import annotations

import argparse
import os
import stat
import struct
import sys
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, BinaryIO

from espswitch.ipsec import (
    EspDrop,
    InboundSA,
    IpsecConfigError,
    OutboundSA,
    SaParams,
    SaRefused,
    Transform,
    parse_transform,
)
from espswitch.packet.errors import PacketError
from espswitch.packet.esp import NAT_T_PORT, UdpEncapKind, split_udp_encap
from espswitch.packet.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6, parse_ethernet
from espswitch.packet.ipv4 import IPV4_PROTO_ESP, IPV4_PROTO_UDP, ip_to_bytes, ipv4_header_checksum
from espswitch.packet.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    PcapError,
    PcapngReader,
    PcapReader,
    PcapRecord,
    PcapWriter,
    ip_packet_of,
    open_capture,
)

__all__ = ["register"]

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_UDP = struct.Struct("!HHHH")
_SEQ32_MAX = (1 << 32) - 1

_LINKTYPES = {
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_LINUX_SLL2: "Linux cooked (SLL2)",
}


class _ToolError(Exception):
    """A user-facing error: one line on stderr, exit code 2."""


# -- argument types --------------------------------------------------------------------
# Each raises ArgumentTypeError (never ValueError): argparse then shows our message alone,
# whereas for ValueError it would echo the value, and the value of --key is a secret.


def _spi(text: str) -> int:
    try:
        value = int(text[2:], 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"SPI {text!r} is not a number (decimal or 0x hex)") from None
    if not 1 <= value <= _SEQ32_MAX:
        raise argparse.ArgumentTypeError(f"SPI {text!r} out of range 1 to 2^32-1")
    return value


def _u32(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= _SEQ32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} out of range 0 to 2^32-1")
    return value


def _key(text: str) -> bytes:
    digits = text.strip()
    if digits[:2].lower() == "0x":
        digits = digits[2:]
    digits = digits.replace(":", "")
    if not all(c in "0123456789abcdefABCDEF" for c in digits):
        raise argparse.ArgumentTypeError(
            "the key is not hex (use hex digits, with an optional 0x prefix and ':' separators)")
    if len(digits) % 2:
        raise argparse.ArgumentTypeError(
            f"the key has an odd number of hex digits ({len(digits)})")
    return bytes.fromhex(digits)


def _transform(text: str) -> Transform:
    try:
        return parse_transform(text)
    except IpsecConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ipv4(text: str) -> bytes:
    try:
        return ip_to_bytes(text)
    except PacketError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


# -- the parser ------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add `esp decrypt` and `esp encrypt` to the `espswitch` subcommand parsers."""
    esp = subparsers.add_parser(
        "esp", help="decrypt or encrypt ESP in pcap captures (offline)",
        description="Offline ESP tools for classic pcap captures, using the datapath's ESP code.")
    sub = esp.add_subparsers(dest="esp_command", required=True, metavar="{decrypt,encrypt}")

    dec = sub.add_parser(
        "decrypt", help="replace the ESP packets of one SPI by the packets they protected",
        description="Rewrite every ESP packet of SPI (raw ESP, or UDP-encapsulated on port "
        "4500) as the packet it protected, checking its ICV. Other packets, and packets that "
        "fail (reported on stderr as 'packet N: reason'), are copied unchanged. Exit code: 0 "
        "when every ESP packet of SPI decrypted, 1 when any failed, 2 for a usage error.")
    _common_options(dec)
    dec.add_argument("--udp-encap", action="store_true",
                     help="accepted for symmetry with encrypt: UDP-encapsulated ESP "
                     "(RFC 3948) is detected anyway")
    dec.add_argument("input", metavar="IN.pcap", help="the capture to read")
    dec.add_argument("output", metavar="OUT.pcap", help="the capture to write")
    dec.set_defaults(func=_run_decrypt, prog=dec.prog)

    enc = sub.add_parser(
        "encrypt", help="protect the IP packets of a capture with ESP",
        description="Protect every IPv4 packet (transport mode) or every IPv4/IPv6 packet "
        "(tunnel mode) of the capture with ESP; other packets are copied unchanged. Exit "
        "code: 0 when every packet was protected, 1 when any failed, 2 for a usage error.")
    _common_options(enc)
    enc.add_argument("--seq", type=_u32, default=1, metavar="N",
                     help="the first sequence number (its low 32 bits with --esn-high); "
                     "default 1")
    enc.add_argument("--tunnel-src", type=_ipv4, metavar="IP",
                     help="tunnel mode: outer source address (default: the packet's own)")
    enc.add_argument("--tunnel-dst", type=_ipv4, metavar="IP",
                     help="tunnel mode: outer destination address (default: the packet's own)")
    enc.add_argument("--udp-encap", action="store_true",
                     help="wrap ESP in UDP port 4500 (RFC 3948, checksum 0)")
    enc.add_argument("input", metavar="IN.pcap", help="the capture to read")
    enc.add_argument("output", metavar="OUT.pcap", help="the capture to write")
    enc.set_defaults(func=_run_encrypt, prog=enc.prog)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--esp", required=True, type=_transform, metavar="TRANSFORM",
                   help="the ESP transform in strongSwan syntax, e.g. aes128gcm16, "
                   "chacha20poly1305, aes256-sha256; suffix -esn for extended sequence numbers")
    p.add_argument("--spi", required=True, type=_spi, help="the SPI, decimal or 0x hex")
    p.add_argument("--key", required=True, type=_key, metavar="HEX",
                   help="the keying material in hex: encryption key (+ 4-byte salt for GCM "
                   "and ChaCha20-Poly1305), then the integrity key")
    p.add_argument("--esn-high", type=_u32, default=0, metavar="N",
                   help="the high half of the extended sequence number of the first packet")
    p.add_argument("--mode", choices=("transport", "tunnel"), default="transport",
                   help="the ESP mode (default transport)")


# -- shared plumbing -------------------------------------------------------------------


def _params(args: argparse.Namespace, **extra: Any) -> SaParams:
    t: Transform = args.esp
    if args.esn_high and not t.esn:
        raise _ToolError(f"--esn-high needs extended sequence numbers: use --esp {t.name}-esn")
    try:
        t.split_keymat(args.key)
    except IpsecConfigError as exc:
        # The engine's message names the length needed and never the key itself.
        raise _ToolError(f"--key: {exc}") from None
    try:
        return SaParams(spi=args.spi, transform=t, keymat=args.key, mode=args.mode, **extra)
    except IpsecConfigError as exc:
        raise _ToolError(str(exc)) from None


@dataclass(slots=True, kw_only=True)
class _Files:
    reader: PcapReader | PcapngReader
    writer: PcapWriter
    infile: BinaryIO
    outfile: BinaryIO
    input: str
    output: str
    out_mode: int

    def records(self) -> Iterator[PcapRecord]:
        """The input's records; a damaged file is a _ToolError naming it."""
        try:
            yield from self.reader
        except PcapError as exc:
            raise _ToolError(f"{self.input}: {exc.what}") from None
        except OSError as exc:
            raise _ToolError(f"{self.input}: cannot read: {exc.strerror}") from None


def _open_files(args: argparse.Namespace, out_linktype: Any = None) -> _Files:
    """Open and check the input capture, then create the output (in that order)."""
    try:
        infile = open(args.input, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise _ToolError(f"{args.input}: no such file") from None
    except IsADirectoryError:
        raise _ToolError(f"{args.input}: is a directory, not a pcap file") from None
    except OSError as exc:
        raise _ToolError(f"{args.input}: cannot read: {exc.strerror}") from None
    try:
        try:
            reader = open_capture(infile)
        except PcapError as exc:
            raise _ToolError(f"{args.input}: {exc.what}") from None
        except OSError as exc:
            raise _ToolError(f"{args.input}: cannot read: {exc.strerror}") from None
        if reader.linktype not in _LINKTYPES:
            raise _ToolError(
                f"{args.input}: unsupported link type {reader.linktype} (use Ethernet, raw IP "
                "or Linux cooked captures)")
        with suppress(OSError):
            if os.path.samefile(args.input, args.output):
                raise _ToolError(f"{args.output}: is the input file; write to another file")
        linktype = reader.linktype if out_linktype is None else out_linktype(reader.linktype)
        try:
            outfile = open(args.output, "wb")  # noqa: SIM115 - closed by the caller
        except OSError as exc:
            raise _ToolError(f"{args.output}: cannot write: {exc.strerror}") from None
    except BaseException:
        infile.close()
        raise
    writer = PcapWriter(outfile, linktype=linktype, snaplen=max(reader.snaplen, 262144),
                        nanosecond=reader.nanosecond)
    return _Files(reader=reader, writer=writer, infile=infile, outfile=outfile,
                  input=args.input, output=args.output, out_mode=os.fstat(outfile.fileno()).st_mode)


def _run(args: argparse.Namespace, body: Any) -> int:
    """Run a command body, turning a _ToolError into one line on stderr and exit code 2."""
    try:
        return body(args)
    except _ToolError as exc:
        print(f"{args.prog}: {exc}", file=sys.stderr)
        return 2


def _process(args: argparse.Namespace, per_record: Any, out_linktype: Any = None) -> None:
    files = _open_files(args, out_linktype)
    ok = False
    try:
        linktype = files.reader.linktype
        for n, rec in enumerate(files.records(), 1):
            data = per_record(n, rec.data, linktype)
            orig_len = rec.orig_len if data is rec.data else len(data)
            try:
                files.writer.write(data, rec.ts_sec, rec.ts_frac, max(orig_len, len(data)))
            except OSError as exc:
                raise _ToolError(f"{files.output}: cannot write: {exc.strerror}") from None
        ok = True
    finally:
        files.infile.close()
        try:
            files.outfile.close()
        except OSError as exc:
            ok = False
            raise _ToolError(f"{files.output}: cannot write: {exc.strerror}") from None
        finally:
            # A half-written capture looks complete to other tools: do not leave one. Only a
            # regular file, though: OUT may be /dev/null or a FIFO.
            if not ok and stat.S_ISREG(files.out_mode):
                with suppress(OSError):
                    os.unlink(files.output)


def _locate_ip(data: bytes, linktype: int) -> tuple[int, int] | None:
    """Return (offset, IP version) of the IP packet in a record, or None if it has none."""
    try:
        _prefix, off = ip_packet_of(data, linktype)
        return off, 4
    except PacketError:
        pass
    # ip_packet_of finds IPv4 only; tunnel mode also carries IPv6.
    off = None
    n = len(data)
    try:
        if linktype == LINKTYPE_ETHERNET:
            eth = parse_ethernet(data)
            if eth.ethertype == ETHERTYPE_IPV6:
                off = eth.payload_offset
        elif linktype == LINKTYPE_RAW:
            off = 0
        elif linktype == LINKTYPE_LINUX_SLL and n >= 16:
            off = 16 if _U16.unpack_from(data, 14)[0] == ETHERTYPE_IPV6 else None
        elif linktype == LINKTYPE_LINUX_SLL2 and n >= 20:
            off = 20 if _U16.unpack_from(data, 0)[0] == ETHERTYPE_IPV6 else None
    except PacketError:
        return None
    if off is None or n < off + 40 or data[off] >> 4 != 6:
        return None
    return off, 6


def _set_ethertype(prefix: bytes, linktype: int, ethertype: int) -> bytes:
    """Return the link-layer header `prefix` with its protocol field set to `ethertype`."""
    if linktype in (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL):
        # Ethernet (tagged or not) and SLL both end with the ethertype.
        return prefix[:-2] + _U16.pack(ethertype)
    if linktype == LINKTYPE_LINUX_SLL2:
        return _U16.pack(ethertype) + prefix[2:]
    return prefix


# -- decrypt ---------------------------------------------------------------------------


def _run_decrypt(args: argparse.Namespace) -> int:
    return _run(args, _decrypt)


def _decrypt(args: argparse.Namespace) -> int:
    # Offline: no replay check (a capture may repeat or reorder packets); ESN inference
    # still follows the highest sequence number seen, starting in epoch --esn-high.
    sa = InboundSA(_params(args, replay_window=0), esn_high=args.esn_high)
    tunnel = args.mode == "tunnel"
    total = failed = 0
    other_spis: set[int] = set()

    def fail(n: int, reason: str) -> None:
        nonlocal failed
        failed += 1
        print(f"packet {n}: {reason}", file=sys.stderr)

    def per_record(n: int, data: bytes, linktype: int) -> bytes:
        nonlocal total
        loc = _locate_ip(data, linktype)
        if loc is None or loc[1] != 4:
            return data
        off = loc[0]
        if len(data) < off + 20:
            return data
        ihl = (data[off] & 0x0F) * 4
        ip_len = _U16.unpack_from(data, off + 2)[0]
        proto = data[off + 9]
        frag = _U16.unpack_from(data, off + 6)[0]
        first_fragment = frag & 0x1FFF == 0
        end = min(off + ip_len, len(data))
        if ihl < 20 or ip_len < ihl or not first_fragment:
            return data
        if proto == IPV4_PROTO_ESP:
            esp_off = off + ihl
        elif proto == IPV4_PROTO_UDP and end - (off + ihl) >= 8:
            sport, dport, udp_len, _csum = _UDP.unpack_from(data, off + ihl)
            if NAT_T_PORT not in (sport, dport):
                return data
            esp_off = off + ihl + 8
            try:
                kind = split_udp_encap(data[esp_off:off + ihl + min(udp_len, ip_len - ihl)])
            except PacketError:
                return data
            if kind is not UdpEncapKind.ESP:
                return data  # IKE (non-ESP marker) or a NAT keepalive
        else:
            return data
        if end - esp_off < 4:
            return data
        spi = _U32.unpack_from(data, esp_off)[0]
        if spi != args.spi:
            other_spis.add(spi)
            return data
        total += 1
        if frag & 0x2000:
            fail(n, "IP fragment of an ESP packet: reassemble the capture first")
            return data
        if off + ip_len > len(data):
            fail(n, f"packet cut short in the capture ({len(data) - off} of {ip_len} IP bytes "
                 "captured): capture with a larger snapshot length")
            return data
        # The engine takes raw ESP over IPv4; a UDP-encapsulated packet loses its UDP header.
        packet = bytearray(data[off:off + ihl])
        packet[9] = IPV4_PROTO_ESP
        packet += data[esp_off:off + ip_len]
        _U16.pack_into(packet, 2, len(packet))
        try:
            inner = sa.unprotect(packet)
        except EspDrop as exc:
            fail(n, exc.reason.description)
            return data
        prefix = data[:off]
        if tunnel:
            ethertype = ETHERTYPE_IPV6 if inner[0] >> 4 == 6 else ETHERTYPE_IPV4
            prefix = _set_ethertype(prefix, linktype, ethertype)
        return prefix + bytes(inner)

    # A raw-IPv4 capture cannot hold the IPv6 packets a tunnel may carry: write raw IP.
    out_linktype = (lambda lt: LINKTYPE_RAW if lt == LINKTYPE_IPV4 else lt) if tunnel else None
    _process(args, per_record, out_linktype)
    print(f"decrypted {total - failed} of {total} ESP packets for SPI 0x{args.spi:08x}; "
          f"{failed} failed")
    if total == 0 and other_spis:
        seen = ", ".join(f"0x{s:08x}" for s in sorted(other_spis)[:8])
        print(f"{args.prog}: note: no ESP packet has SPI 0x{args.spi:08x}; the capture has "
              f"SPIs {seen}", file=sys.stderr)
    return 1 if failed else 0


# -- encrypt ---------------------------------------------------------------------------


def _run_encrypt(args: argparse.Namespace) -> int:
    return _run(args, _encrypt)


def _encrypt(args: argparse.Namespace) -> int:
    tunnel = args.mode == "tunnel"
    if not tunnel and (args.tunnel_src or args.tunnel_dst):
        raise _ToolError("--tunnel-src and --tunnel-dst need --mode tunnel")
    first = (args.esn_high << 32) | args.seq
    if first == 0:
        raise _ToolError("--seq must be at least 1 (sequence number 0 is never sent)")
    # Placeholder outer addresses: the real ones are set per packet below.
    extra = {"tunnel_src": bytes(4), "tunnel_dst": bytes(4)} if tunnel else {}
    params = _params(args, **extra)
    try:
        sa = OutboundSA(params, seq_start=first)
    except IpsecConfigError as exc:
        raise _ToolError(str(exc)) from None
    total = failed = 0

    def fail(n: int, reason: str) -> None:
        nonlocal failed
        failed += 1
        print(f"packet {n}: {reason}", file=sys.stderr)

    def per_record(n: int, data: bytes, linktype: int) -> bytes:
        nonlocal total
        loc = _locate_ip(data, linktype)
        if loc is None or (loc[1] == 6 and not tunnel):
            return data
        off, version = loc
        total += 1
        if version == 4:
            ip_len = _U16.unpack_from(data, off + 2)[0] if len(data) >= off + 20 else 0
        else:
            ip_len = 40 + _U16.unpack_from(data, off + 4)[0]
        if off + ip_len > len(data):
            fail(n, f"packet cut short in the capture ({len(data) - off} of {ip_len} IP bytes "
                 "captured)")
            return data
        # Only the IP packet itself: Ethernet padding after it is not part of the payload.
        ip = data[off:off + ip_len]
        if tunnel:
            src = args.tunnel_src or (ip[12:16] if version == 4 else None)
            dst = args.tunnel_dst or (ip[16:20] if version == 4 else None)
            if src is None or dst is None:
                fail(n, "IPv6 packet: give --tunnel-src and --tunnel-dst (the outer header "
                     "is IPv4)")
                return data
        try:
            out = sa.protect(ip)
        except SaRefused as exc:
            fail(n, exc.reason.description)
            return data
        except ValueError as exc:
            fail(n, str(exc))
            return data
        if tunnel:
            out[12:16] = src
            out[16:20] = dst
        ihl = (out[0] & 0x0F) * 4
        if args.udp_encap:
            esp_len = len(out) - ihl
            udp = _UDP.pack(NAT_T_PORT, NAT_T_PORT, 8 + esp_len, 0)
            out[ihl:ihl] = udp
            out[9] = IPV4_PROTO_UDP
            _U16.pack_into(out, 2, len(out))
        if tunnel or args.udp_encap:
            _U16.pack_into(out, 10, ipv4_header_checksum(out[:ihl]))
        prefix = data[:off]
        if version == 6:
            prefix = _set_ethertype(prefix, linktype, ETHERTYPE_IPV4)
        return prefix + bytes(out)

    _process(args, per_record)
    kind = "IP" if tunnel else "IPv4"
    print(f"encrypted {total - failed} of {total} {kind} packets with SPI 0x{args.spi:08x}; "
          f"{failed} failed")
    return 1 if failed else 0
