"""Turn the ESP options of a `vxlanipsec` interface (strings, as OVSDB holds them) into SA
parameters: the transform, mode and encapsulation every tunnel has, and the SA pair of a
manually keyed one. Which keying a tunnel uses, and the options of IKE keying, are
`espswitch.ike.options`' business: nothing here knows of IKE.

Every error names the option and what it accepts, and never repeats a key's value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from espswitch.ipsec.errors import IpsecConfigError
from espswitch.ipsec.replay import MAX_WINDOW
from espswitch.ipsec.sa import Lifetime, Mode, SaParams
from espswitch.ipsec.transforms import TRANSFORM_NAMES, Transform, parse_transform
from espswitch.values import parse_uint

MANUAL_OPTIONS = ("spi_out", "spi_in", "esp_key_out", "esp_key_in")
# Options that mean something for manual keying only (IKE-keyed tunnels rekey instead).
MANUAL_ONLY_OPTIONS = ("lifetime_packets", "lifetime_bytes")
# The options this layer reads: the ESP of every tunnel and the keys of manual keying.
ESP_OPTIONS = frozenset({
    "esp", "ipsec_mode", "replay_window", "lifetime_packets", "lifetime_bytes",
    "ipsec_encapsulation", *MANUAL_OPTIONS,
})
SPI_MIN = 256  # RFC 4303 §2.1: 1 to 255 are reserved by IANA, 0 is for local use
DEFAULT_ESP = "aes128gcm16"


@dataclass(frozen=True, slots=True, kw_only=True)
class ManualKeying:
    """A tunnel's manually keyed SA pair, validated."""

    transform: Transform
    mode: Mode
    encapsulation: bool
    outbound: SaParams
    inbound: SaParams = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class EspOptions:
    """What every `vxlanipsec` tunnel says about its ESP, however it is keyed."""

    transform: Transform
    mode: Mode
    encapsulation: bool
    replay_window: int
    hard: Lifetime  # lifetime_packets/lifetime_bytes


def int_option(options: Mapping[str, str], name: str, lo: int, hi: int, default: int | None,
               what: str) -> int | None:
    """options:`name` as an integer from `lo` to `hi` (`default` when unset); else
    IpsecConfigError saying it must be `what`."""
    text = options.get(name)
    if text is None or text == "":
        return default
    value = parse_uint(text)
    if value is None or not lo <= value <= hi:
        raise IpsecConfigError(f"options:{name} must be {what}, got {text!r}")
    return value


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


def parse_esp_options(options: Mapping[str, str]) -> EspOptions:
    """Validate the options every `vxlanipsec` tunnel has: esp, ipsec_mode,
    ipsec_encapsulation, replay_window, lifetime_packets and lifetime_bytes.

    Raises IpsecConfigError with one sentence naming the offending option.
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
    window = int_option(options, "replay_window", 0, MAX_WINDOW, 1024,
                        f"a number of packets from 0 to {MAX_WINDOW}")
    packets = int_option(options, "lifetime_packets", 1, 2**64 - 1, None, "a positive number")
    nbytes = int_option(options, "lifetime_bytes", 1, 2**64 - 1, None, "a positive number")
    return EspOptions(transform=transform, mode=mode, encapsulation=encap_text in ("yes", "true"),
                      replay_window=window, hard=Lifetime(packets=packets, bytes=nbytes))


def missing_manual_options(options: Mapping[str, str]) -> list[str]:
    """The options of manual keying that `options` lacks (all four are needed)."""
    return [o for o in MANUAL_OPTIONS if not options.get(o)]


def parse_manual_keying(options: Mapping[str, str], esp: EspOptions, *,
                        local_ip: bytes | None = None,
                        remote_ip: bytes | None = None) -> ManualKeying:
    """The manually keyed SA pair of a tunnel whose ESP options are `esp`: spi_out, spi_in,
    esp_key_out and esp_key_in. Raises IpsecConfigError naming the offending option."""
    missing = missing_manual_options(options)
    if missing:
        raise IpsecConfigError(f"manual keying needs {', '.join(missing)}")
    transform = esp.transform
    spi_what = f"a number from {SPI_MIN} to {2**32 - 1} (decimal or 0x hex)"
    spi_out = int_option(options, "spi_out", SPI_MIN, 2**32 - 1, None, spi_what)
    spi_in = int_option(options, "spi_in", SPI_MIN, 2**32 - 1, None, spi_what)
    common = {"transform": transform, "mode": esp.mode, "replay_window": esp.replay_window,
              "hard": esp.hard}
    outbound = SaParams(spi=spi_out, keymat=_key(options, "esp_key_out", transform),
                        tunnel_src=local_ip, tunnel_dst=remote_ip, **common)
    inbound = SaParams(spi=spi_in, keymat=_key(options, "esp_key_in", transform),
                       tunnel_src=remote_ip, tunnel_dst=local_ip, **common)
    return ManualKeying(transform=transform, mode=esp.mode, encapsulation=esp.encapsulation,
                        outbound=outbound, inbound=inbound)
