"""ESP transforms by their strongSwan proposal names, and what each needs on the wire."""

from __future__ import annotations

from dataclasses import dataclass, replace

from espswitch.ipsec.errors import IpsecConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class Transform:
    """One ESP transform: its algorithms and the lengths the wire format needs.

    `block_size` is what the plaintext (payload, padding, pad length, next header) is
    padded to: the cipher block for CBC, 4 bytes (RFC 4303 §2.4 alignment) otherwise.
    """

    name: str
    cipher: str  # "aes-gcm", "chacha20-poly1305", "aes-cbc", "null"
    integrity: str  # "aead", "hmac-sha256", "hmac-sha1"
    enc_key_len: int
    salt_len: int
    integ_key_len: int
    iv_len: int
    icv_len: int
    block_size: int
    esn: bool = False

    @property
    def aead(self) -> bool:
        """True for combined-mode transforms (GCM, ChaCha20-Poly1305)."""
        return self.integrity == "aead"

    @property
    def keymat_len(self) -> int:
        """Bytes of keying material: encryption key, salt, then integrity key (RFC 7296)."""
        return self.enc_key_len + self.salt_len + self.integ_key_len

    @property
    def proposal(self) -> str:
        """The name as configured, with `-esn` when extended sequence numbers are on."""
        return self.name + ("-esn" if self.esn else "")

    def overhead(self, payload_len: int) -> int:
        """ESP bytes added to a payload of `payload_len` bytes (header, IV, pad, trailer, ICV)."""
        pad = -(payload_len + 2) % self.block_size
        return 8 + self.iv_len + pad + 2 + self.icv_len

    def max_overhead(self) -> int:
        """The largest ESP overhead for any payload length (worst-case padding)."""
        return 8 + self.iv_len + (self.block_size - 1) + 2 + self.icv_len

    def split_keymat(self, keymat: bytes) -> tuple[bytes, bytes, bytes]:
        """Split keying material into (encryption key, salt, integrity key), checking its length."""
        if len(keymat) != self.keymat_len:
            raise IpsecConfigError(
                f"{self.name} needs {self.keymat_len} bytes of keying material "
                f"({self.key_layout()}), got {len(keymat)}"
            )
        e, s = self.enc_key_len, self.salt_len
        return keymat[:e], keymat[e : e + s], keymat[e + s :]

    def key_layout(self) -> str:
        """Describe the keying material layout, e.g. '16-byte key + 4-byte salt'."""
        parts = []
        if self.enc_key_len:
            parts.append(f"{self.enc_key_len}-byte key")
        if self.salt_len:
            parts.append(f"{self.salt_len}-byte salt")
        if self.integ_key_len:
            parts.append(f"{self.integ_key_len}-byte integrity key")
        return " + ".join(parts)


def _t(name: str, cipher: str, integrity: str, ek: int, salt: int, ik: int, iv: int, icv: int,
       block: int) -> Transform:
    return Transform(name=name, cipher=cipher, integrity=integrity, enc_key_len=ek,
                     salt_len=salt, integ_key_len=ik, iv_len=iv, icv_len=icv, block_size=block)


_TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        _t("aes128gcm16", "aes-gcm", "aead", 16, 4, 0, 8, 16, 4),
        _t("aes192gcm16", "aes-gcm", "aead", 24, 4, 0, 8, 16, 4),
        _t("aes256gcm16", "aes-gcm", "aead", 32, 4, 0, 8, 16, 4),
        _t("chacha20poly1305", "chacha20-poly1305", "aead", 32, 4, 0, 8, 16, 4),
        _t("aes128-sha256", "aes-cbc", "hmac-sha256", 16, 0, 32, 16, 16, 16),
        _t("aes256-sha256", "aes-cbc", "hmac-sha256", 32, 0, 32, 16, 16, 16),
        _t("aes128-sha1", "aes-cbc", "hmac-sha1", 16, 0, 20, 16, 12, 16),
        _t("null-sha256", "null", "hmac-sha256", 0, 0, 32, 0, 16, 4),
    )
}

TRANSFORM_NAMES: tuple[str, ...] = tuple(_TRANSFORMS)
"""Every accepted transform name, without the `-esn` suffix."""

# strongSwan also spells these ways; accept them so operators can paste proposals.
_ALIASES = {
    "aes128gcm128": "aes128gcm16",
    "aes192gcm128": "aes192gcm16",
    "aes256gcm128": "aes256gcm16",
    "aes128-sha2_256": "aes128-sha256",
    "aes256-sha2_256": "aes256-sha256",
    "aes128-sha": "aes128-sha1",
    "null-sha2_256": "null-sha256",
}


def parse_transform(text: str) -> Transform:
    """Parse a strongSwan-style ESP proposal such as `aes256gcm16-esn`.

    Raises IpsecConfigError naming the accepted values when the name is unknown.
    """
    name = text.strip().lower()
    esn = False
    if name.endswith("-noesn"):
        name = name[: -len("-noesn")]
    elif name.endswith("-esn"):
        name, esn = name[: -len("-esn")], True
    name = _ALIASES.get(name, name)
    base = _TRANSFORMS.get(name)
    if base is None:
        raise IpsecConfigError(
            f"unknown ESP transform {text!r}: use one of {', '.join(TRANSFORM_NAMES)}"
            " (optionally with -esn)"
        )
    return replace(base, esn=True) if esn else base
