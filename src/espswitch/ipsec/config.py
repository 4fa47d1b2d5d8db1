"""Turn `vxlanipsec` interface options (strings, as OVSDB holds them) into SA parameters.

Every error names the option and what it accepts, and never repeats a key's value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from espswitch.ipsec.errors import IpsecConfigError
from espswitch.ipsec.replay import MAX_WINDOW
from espswitch.ipsec.sa import Lifetime, Mode, SaParams
from espswitch.ipsec.transforms import TRANSFORM_NAMES, Transform, parse_transform
from espswitch.values import parse_udecimal, parse_uint

MANUAL_OPTIONS = ("spi_out", "spi_in", "esp_key_out", "esp_key_in")
IKE_OPTIONS = ("psk", "remote_cert", "remote_name")
# Options that mean something for one way of keying only: set on the other, they would be
# silently ignored, so they are refused.
MANUAL_ONLY_OPTIONS = ("lifetime_packets", "lifetime_bytes")
IKE_ONLY_OPTIONS = ("ike", "rekey_time", "ike_rekey_time", "rekey_bytes", "rekey_packets",
                    "dpd_delay")
IPSEC_OPTIONS = frozenset({
    "esp", "ipsec_mode", "replay_window", "lifetime_packets", "lifetime_bytes",
    "ipsec_encapsulation", "ike", "rekey_time", "ike_rekey_time", "rekey_bytes",
    "rekey_packets", "dpd_delay", *MANUAL_OPTIONS, *IKE_OPTIONS,
})
SPI_MIN = 256  # RFC 4303 §2.1: 1 to 255 are reserved by IANA, 0 is for local use
DEFAULT_ESP = "aes128gcm16"
DEFAULT_IKE = "aes128gcm16-prfsha256-x25519"


@dataclass(frozen=True, slots=True, kw_only=True)
class ManualKeying:
    """A tunnel's manually keyed SA pair, validated."""

    transform: Transform
    mode: Mode
    encapsulation: bool
    outbound: SaParams
    inbound: SaParams = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class IkeKeying:
    """A tunnel keyed by IKEv2: what the IKE daemon needs (secrets are not shown)."""

    transform: Transform
    mode: Mode
    encapsulation: bool
    psk: bytes | None = field(repr=False, default=None)
    remote_cert: str | None = None
    remote_name: str | None = None
    ike: str = DEFAULT_IKE
    esp: str = DEFAULT_ESP
    replay_window: int = 1024
    rekey_time: float = 3600.0
    ike_rekey_time: float = 14400.0
    dpd_delay: float = 30.0
    rekey_bytes: int | None = None
    rekey_packets: int | None = None


def _int(options: Mapping[str, str], name: str, lo: int, hi: int, default: int | None,
         what: str) -> int | None:
    text = options.get(name)
    if text is None or text == "":
        return default
    value = parse_uint(text)
    if value is None or not lo <= value <= hi:
        raise IpsecConfigError(f"options:{name} must be {what}, got {text!r}")
    return value


def _seconds(options: Mapping[str, str], name: str, default: float) -> float:
    text = options.get(name)
    if text is None or text == "":
        return default
    value = parse_udecimal(text)
    if value is None or not 1.0 <= value <= 10 * 365 * 86400.0:
        raise IpsecConfigError(f"options:{name} must be a number of seconds from 1, got {text!r}")
    return value


# The syntax of IKE proposals and identities belongs to espswitch.ike, a layer above this
# one: it installs its checker here when it is imported (espswitchd imports it before any
# tunnel is configured). Without it those values are checked when IKE starts instead.
IkeSyntaxCheck = Callable[[str, str], "str | None"]
_ike_syntax: IkeSyntaxCheck | None = None


def set_ike_syntax_check(check: IkeSyntaxCheck) -> None:
    """Install `check(what, text) -> problem or None`, `what` being "ike", "esp" or
    "identity"."""
    global _ike_syntax
    _ike_syntax = check


def _ike_keying(options: Mapping[str, str], transform: Transform, mode: Mode, encap: bool,
                window: int) -> IkeKeying:
    """Validate what IKEv2 needs: the proposals, timers and credentials' options."""
    check = _ike_syntax or (lambda what, text: None)
    ike = (options.get("ike") or DEFAULT_IKE).strip()
    problem = check("ike", ike)
    if problem:
        raise IpsecConfigError(
            f"options:ike {options.get('ike')!r} is not a usable IKE proposal ({problem}); "
            f"use strongSwan's encryption-prf-group syntax, for example {DEFAULT_IKE}")
    esp = (options.get("esp") or DEFAULT_ESP).strip()
    problem = check("esp", esp)
    if problem:
        raise IpsecConfigError(
            f"options:esp {options.get('esp')!r} cannot be negotiated with IKEv2 ({problem})")
    if not options.get("remote_cert") and not options.get("psk") and \
            not options.get("remote_name"):
        raise IpsecConfigError(
            "IKEv2 needs options:psk (a pre-shared key), or options:remote_cert or "
            "options:remote_name (certificates)")
    if options.get("psk") is not None and not options["psk"]:
        raise IpsecConfigError("options:psk must not be empty")
    if options.get("remote_cert") and options.get("psk"):
        raise IpsecConfigError(
            "options:psk and options:remote_cert cannot be combined: choose a pre-shared key "
            "or certificates")
    rekey_time = _seconds(options, "rekey_time", 3600.0)
    ike_rekey_time = _seconds(options, "ike_rekey_time", 14400.0)
    dpd_delay = _seconds(options, "dpd_delay", 30.0)
    rekey_bytes = _int(options, "rekey_bytes", 1, 2**64 - 1, None, "a positive number of bytes")
    rekey_packets = _int(options, "rekey_packets", 1, 2**64 - 1, None,
                         "a positive number of packets")
    remote_name = (options.get("remote_name") or "").strip() or None
    if remote_name is not None and check("identity", remote_name):
        raise IpsecConfigError(
            f"options:remote_name {options.get('remote_name')!r} is not an identity (an "
            "IPv4 address, a host name, an e-mail address or a distinguished name)")
    return IkeKeying(
        transform=transform, mode=mode, encapsulation=encap,
        psk=options["psk"].encode() if options.get("psk") else None,
        remote_cert=options.get("remote_cert") or None, remote_name=remote_name,
        ike=ike, esp=esp, replay_window=window, rekey_time=rekey_time,
        ike_rekey_time=ike_rekey_time, dpd_delay=dpd_delay, rekey_bytes=rekey_bytes,
        rekey_packets=rekey_packets)


def _key(options: Mapping[str, str], name: str, transform: Transform) -> bytes:
    text = options[name].strip().lower().removeprefix("0x").replace(":", "")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        # Never echo the value: it is (meant to be) a secret.
        raise IpsecConfigError(f"options:{name} must be hexadecimal keying material") from None
    if len(key) != transform.keymat_len:
        raise IpsecConfigError(
            f"options:{name} must be {transform.keymat_len} bytes for {transform.name} "
            f"({transform.key_layout()}), got {len(key)}"
        )
    return key


def parse_ipsec_options(options: Mapping[str, str], *, local_ip: bytes | None = None,
                        remote_ip: bytes | None = None) -> ManualKeying | IkeKeying:
    """Validate a `vxlanipsec` interface's IPsec options.

    Returns the manual SA pair, or what IKE needs. Raises IpsecConfigError with one
    sentence naming the offending option.
    """
    try:
        transform = parse_transform(options.get("esp") or DEFAULT_ESP)
    except IpsecConfigError:
        raise IpsecConfigError(
            f"options:esp {options.get('esp')!r} is not a known ESP transform: use one of "
            f"{', '.join(TRANSFORM_NAMES)}, optionally with -esn"
        ) from None
    mode_text = (options.get("ipsec_mode") or "transport").strip().lower()
    if mode_text not in ("transport", "tunnel"):
        raise IpsecConfigError(
            f"options:ipsec_mode must be transport or tunnel, got {options.get('ipsec_mode')!r}")
    mode = Mode(mode_text)
    encap_text = (options.get("ipsec_encapsulation") or "no").strip().lower()
    if encap_text not in ("yes", "no", "true", "false"):
        raise IpsecConfigError(
            f"options:ipsec_encapsulation must be yes or no, got "
            f"{options.get('ipsec_encapsulation')!r}")
    encap = encap_text in ("yes", "true")
    window = _int(options, "replay_window", 0, MAX_WINDOW, 1024,
                  f"a number of packets from 0 to {MAX_WINDOW}")
    packets = _int(options, "lifetime_packets", 1, 2**64 - 1, None, "a positive number")
    nbytes = _int(options, "lifetime_bytes", 1, 2**64 - 1, None, "a positive number")

    manual = [o for o in MANUAL_OPTIONS if options.get(o)]
    ike = [o for o in IKE_OPTIONS if options.get(o)]
    if manual and ike:
        raise IpsecConfigError(
            f"options {', '.join(manual)} (manual keying) and {', '.join(ike)} (IKEv2) "
            "cannot be combined: choose one keying method")
    if ike:
        stray = [o for o in MANUAL_ONLY_OPTIONS if options.get(o)]
        if stray:
            raise IpsecConfigError(
                f"options:{stray[0]} applies to manually keyed tunnels only; an IKEv2-keyed "
                f"tunnel rekeys by rekey_time, rekey_bytes and rekey_packets")
        return _ike_keying(options, transform, mode, encap, window)
    stray = [o for o in IKE_ONLY_OPTIONS if options.get(o)]
    if stray:
        raise IpsecConfigError(
            f"options:{stray[0]} applies to IKEv2-keyed tunnels only (options:psk, remote_cert "
            f"or remote_name); this tunnel is keyed manually")
    if len(manual) != len(MANUAL_OPTIONS):
        missing = [o for o in MANUAL_OPTIONS if o not in manual]
        raise IpsecConfigError(
            f"vxlanipsec needs keys: set {', '.join(MANUAL_OPTIONS)} (manual keying) or psk "
            f"(IKEv2); missing {', '.join(missing)}")
    spi_what = f"a number from {SPI_MIN} to {2**32 - 1} (decimal or 0x hex)"
    spi_out = _int(options, "spi_out", SPI_MIN, 2**32 - 1, None, spi_what)
    spi_in = _int(options, "spi_in", SPI_MIN, 2**32 - 1, None, spi_what)
    hard = Lifetime(packets=packets, bytes=nbytes)
    common = {"transform": transform, "mode": mode, "replay_window": window, "hard": hard}
    outbound = SaParams(spi=spi_out, keymat=_key(options, "esp_key_out", transform),
                        tunnel_src=local_ip, tunnel_dst=remote_ip, **common)
    inbound = SaParams(spi=spi_in, keymat=_key(options, "esp_key_in", transform),
                       tunnel_src=remote_ip, tunnel_dst=local_ip, **common)
    return ManualKeying(transform=transform, mode=mode, encapsulation=encap,
                        outbound=outbound, inbound=inbound)
