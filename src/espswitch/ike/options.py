"""The IPsec options of a protected tunnel (`vxlanipsec`, or `vxlan`, `geneve`, `gre` that
these options key) as a whole: manual keying (whose options `espswitch.ipsec.config`
parses) or IKEv2 keying (whose options are parsed here, proposals and identities checked
with this package's own parsers), never both.

Every error names the option and what it accepts, and never repeats a key's value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from espswitch.ike.consts import Protocol
from espswitch.ike.errors import IkeConfigError
from espswitch.ike.identity import Identity
from espswitch.ike.proposals import parse_proposals
from espswitch.ipsec.config import (
    DEFAULT_ESP,
    ESP_OPTIONS,
    MANUAL_ONLY_OPTIONS,
    MANUAL_OPTIONS,
    EspOptions,
    ManualKeying,
    int_option,
    missing_manual_options,
    parse_esp_options,
    parse_manual_keying,
)
from espswitch.ipsec.errors import IpsecConfigError
from espswitch.ipsec.sa import Mode
from espswitch.ipsec.transforms import Transform
from espswitch.values import parse_udecimal

__all__ = ["IPSEC_OPTIONS", "IkeKeying", "ManualKeying", "parse_ipsec_options"]

IKE_OPTIONS = ("psk", "remote_cert", "remote_name")
# Options that mean something for IKE keying only: set on a manually keyed tunnel, they
# would be silently ignored, so they are refused.
IKE_ONLY_OPTIONS = ("ike", "rekey_time", "ike_rekey_time", "rekey_bytes", "rekey_packets",
                    "dpd_delay")
IPSEC_OPTIONS = frozenset({*ESP_OPTIONS, *IKE_OPTIONS, *IKE_ONLY_OPTIONS})
DEFAULT_IKE = "aes128gcm16-prfsha256-x25519"


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


def parse_ipsec_options(options: Mapping[str, str], *, local_ip: bytes | None = None,
                        remote_ip: bytes | None = None) -> ManualKeying | IkeKeying:
    """Validate a `vxlanipsec` interface's IPsec options.

    Returns the manual SA pair, or what IKE needs. Raises IpsecConfigError with one
    sentence naming the offending option.
    """
    esp = parse_esp_options(options)
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
        return _ike_keying(options, esp)
    stray = [o for o in IKE_ONLY_OPTIONS if options.get(o)]
    if stray:
        raise IpsecConfigError(
            f"options:{stray[0]} applies to IKEv2-keyed tunnels only (options:psk, remote_cert "
            f"or remote_name); this tunnel is keyed manually")
    missing = missing_manual_options(options)
    if missing:
        raise IpsecConfigError(
            f"a protected tunnel needs keys: set {', '.join(MANUAL_OPTIONS)} (manual keying) "
            f"or psk (IKEv2); missing {', '.join(missing)}")
    return parse_manual_keying(options, esp, local_ip=local_ip, remote_ip=remote_ip)


def _seconds(options: Mapping[str, str], name: str, default: float) -> float:
    text = options.get(name)
    if text is None or text == "":
        return default
    value = parse_udecimal(text)
    if value is None or not 1.0 <= value <= 10 * 365 * 86400.0:
        raise IpsecConfigError(f"options:{name} must be a number of seconds from 1, got {text!r}")
    return value


def _syntax_problem(what: str, text: str) -> str | None:
    """The problem with `text` as an IKE proposal, ESP proposal or identity, or None."""
    try:
        if what == "identity":
            Identity.parse(text)
        else:
            parse_proposals(text, Protocol.IKE if what == "ike" else Protocol.ESP)
    except IkeConfigError as e:
        return str(e)
    return None


def _ike_keying(options: Mapping[str, str], esp_options: EspOptions) -> IkeKeying:
    """Validate what IKEv2 needs: the proposals, timers and credentials' options."""
    ike = (options.get("ike") or DEFAULT_IKE).strip()
    problem = _syntax_problem("ike", ike)
    if problem:
        raise IpsecConfigError(
            f"options:ike {options.get('ike')!r} is not a usable IKE proposal ({problem}); "
            f"use strongSwan's encryption-prf-group syntax, for example {DEFAULT_IKE}")
    esp = (options.get("esp") or DEFAULT_ESP).strip()
    problem = _syntax_problem("esp", esp)
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
    rekey_bytes = int_option(options, "rekey_bytes", 1, 2**64 - 1, None,
                             "a positive number of bytes")
    rekey_packets = int_option(options, "rekey_packets", 1, 2**64 - 1, None,
                               "a positive number of packets")
    remote_name = (options.get("remote_name") or "").strip() or None
    if remote_name is not None and _syntax_problem("identity", remote_name):
        raise IpsecConfigError(
            f"options:remote_name {options.get('remote_name')!r} is not an identity (an "
            "IPv4 or IPv6 address, a host name, an e-mail address or a distinguished name)")
    return IkeKeying(
        transform=esp_options.transform, mode=esp_options.mode,
        encapsulation=esp_options.encapsulation,
        psk=options["psk"].encode() if options.get("psk") else None,
        remote_cert=options.get("remote_cert") or None, remote_name=remote_name,
        ike=ike, esp=esp, replay_window=esp_options.replay_window, rekey_time=rekey_time,
        ike_rekey_time=ike_rekey_time, dpd_delay=dpd_delay, rekey_bytes=rekey_bytes,
        rekey_packets=rekey_packets)
