"""IKEv2 cryptography, all through `cryptography`: PRFs and prf+, key derivation,
Diffie-Hellman with the RFC 6989 public-value checks, and SK payload protection.

Objects that hold keys are built once per SA and never show keys in their reprs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.constant_time import bytes_eq

from espswitch.ike.consts import Encr, Group, Integ, Notify, Prf
from espswitch.ike.errors import ProtocolError

__all__ = [
    "DhKey",
    "IkeKeys",
    "SkCipher",
    "derive_child_keymat",
    "derive_ike_keys",
    "prf",
    "prf_plus",
]

Rng = Callable[[int], bytes]

_PRF_HASH = {
    Prf.HMAC_SHA1: hashes.SHA1,
    Prf.HMAC_SHA2_256: hashes.SHA256,
    Prf.HMAC_SHA2_384: hashes.SHA384,
    Prf.HMAC_SHA2_512: hashes.SHA512,
}
PRF_LEN = {Prf.HMAC_SHA1: 20, Prf.HMAC_SHA2_256: 32, Prf.HMAC_SHA2_384: 48,
           Prf.HMAC_SHA2_512: 64}

# integrity id -> (hash, key length, ICV length)
INTEG_PARAMS = {
    Integ.HMAC_SHA1_96: (hashes.SHA1, 20, 12),
    Integ.HMAC_SHA2_256_128: (hashes.SHA256, 32, 16),
    Integ.HMAC_SHA2_384_192: (hashes.SHA384, 48, 24),
    Integ.HMAC_SHA2_512_256: (hashes.SHA512, 64, 32),
}

AEAD_ENCR = (Encr.AES_GCM_16, Encr.CHACHA20_POLY1305)


def prf(prf_id: int, key: bytes, data: bytes) -> bytes:
    """The negotiated PRF (HMAC-SHA1/SHA2)."""
    h = hmac.HMAC(key, _PRF_HASH[prf_id]())
    h.update(data)
    return h.finalize()


def prf_plus(prf_id: int, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ of RFC 7296 §2.13: T1 | T2 | ... truncated to `length` bytes."""
    out = bytearray()
    t = b""
    i = 1
    while len(out) < length:
        if i > 255:
            raise ValueError("prf+ cannot produce that much keying material")
        t = prf(prf_id, key, t + seed + bytes((i,)))
        out += t
        i += 1
    return bytes(out[:length])


def encr_key_len(encr: int, key_bits: int | None) -> int:
    """Bytes of keying material for an encryption transform, salt included for AEADs."""
    if encr == Encr.CHACHA20_POLY1305:
        return 36
    if encr == Encr.NULL:
        return 0
    if key_bits is None:
        raise ValueError("AES needs a key length")
    return key_bits // 8 + (4 if encr == Encr.AES_GCM_16 else 0)


@dataclass(frozen=True, slots=True)
class IkeKeys:
    """The seven IKE SA keys of RFC 7296 §2.14 (never shown in reprs)."""

    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def derive_ike_keys(*, prf_id: int, encr: int, key_bits: int | None, integ: int,
                    shared: bytes, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes,
                    old_sk_d: bytes | None = None, old_prf: int | None = None) -> IkeKeys:
    """SKEYSEED and the seven keys; `old_sk_d` (and its PRF) for an IKE SA rekey (§2.18)."""
    if old_sk_d is None:
        skeyseed = prf(prf_id, ni + nr, shared)
    else:
        skeyseed = prf(old_prf or prf_id, old_sk_d, shared + ni + nr)
    plen = PRF_LEN[prf_id]
    alen = 0 if encr in AEAD_ENCR else INTEG_PARAMS[integ][1]
    elen = encr_key_len(encr, key_bits)
    km = prf_plus(prf_id, skeyseed, ni + nr + spi_i + spi_r, 3 * plen + 2 * alen + 2 * elen)
    parts = []
    off = 0
    for n in (plen, alen, alen, elen, elen, plen, plen):
        parts.append(km[off : off + n])
        off += n
    return IkeKeys(*parts)


def derive_child_keymat(*, prf_id: int, sk_d: bytes, ni: bytes, nr: bytes, length: int,
                        shared: bytes | None = None) -> tuple[bytes, bytes]:
    """KEYMAT of §2.17 split into (initiator-to-responder, responder-to-initiator) halves."""
    seed = (shared or b"") + ni + nr
    km = prf_plus(prf_id, sk_d, seed, 2 * length)
    return km[:length], km[length:]


class SkCipher:
    """SK payload protection for one direction (RFC 7296 §3.14, RFC 5282, RFC 7634)."""

    __slots__ = ("_aead", "_cbc_key", "_icv_len", "_integ", "_iv_ctr", "_rng", "_salt",
                 "block", "iv_len")

    def __init__(self, *, encr: int, enc_key: bytes, integ: int = Integ.NONE,
                 integ_key: bytes = b"", rng: Rng = os.urandom) -> None:
        self._rng = rng
        self._aead: AESGCM | ChaCha20Poly1305 | None = None
        self._cbc_key: algorithms.AES | None = None
        self._integ: tuple[bytes, type] | None = None
        self._iv_ctr = 0
        if encr == Encr.AES_GCM_16:
            self._aead, self._salt = AESGCM(enc_key[:-4]), enc_key[-4:]
        elif encr == Encr.CHACHA20_POLY1305:
            self._aead, self._salt = ChaCha20Poly1305(enc_key[:-4]), enc_key[-4:]
        elif encr == Encr.AES_CBC:
            self._cbc_key, self._salt = algorithms.AES(enc_key), b""
            algo, klen, icv = INTEG_PARAMS[integ]
            if len(integ_key) != klen:
                raise ValueError("bad integrity key length")
            self._integ = (integ_key, algo)
            self._icv_len = icv
        else:
            raise ValueError(f"unsupported IKE encryption {encr}")
        if self._aead is not None:
            self.iv_len, self.block, self._icv_len = 8, 1, 16
        else:
            self.iv_len, self.block = 16, 16

    def __repr__(self) -> str:
        return f"<SkCipher {'aead' if self._aead else 'cbc'}>"

    def sealed_len(self, n: int) -> int:
        """Length of IV + ciphertext + ICV for `n` bytes of inner payloads."""
        pt = n + 1
        pt += -pt % self.block
        return self.iv_len + pt + self._icv_len

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and authenticate; `aad` is the IKE header and the SK generic header."""
        pad = -(len(plaintext) + 1) % self.block
        pt = plaintext + bytes(pad) + bytes((pad,))
        if self._aead is not None:
            # The IV only has to be unique per key (RFC 5282 §3.1): a counter is.
            self._iv_ctr += 1
            iv = struct.pack("!Q", self._iv_ctr)
            return iv + self._aead.encrypt(self._salt + iv, pt, aad)
        iv = self._rng(16)
        enc = Cipher(self._cbc_key, modes.CBC(iv)).encryptor()
        body = iv + enc.update(pt) + enc.finalize()
        return body + self._mac(aad + body)

    def _mac(self, data: bytes) -> bytes:
        key, algo = self._integ
        h = hmac.HMAC(key, algo())
        h.update(data)
        return h.finalize()[: self._icv_len]

    def open(self, aad: bytes, body: bytes) -> bytes:
        """Check and decrypt; return the inner payloads. Any failure is one ProtocolError."""
        # No notify: an unauthenticated message is dropped without an answer (§2.21.2).
        fail = ProtocolError("SK payload failed its integrity check")
        if len(body) < self.iv_len + self._icv_len + 1:
            raise fail
        iv = body[: self.iv_len]
        if self._aead is not None:
            try:
                pt = self._aead.decrypt(self._salt + iv, body[self.iv_len :], aad)
            except InvalidTag:
                raise fail from None
        else:
            ct, icv = body[self.iv_len : -self._icv_len], body[-self._icv_len :]
            if not bytes_eq(self._mac(aad + body[: -self._icv_len]), icv):
                raise fail
            if not ct or len(ct) % 16:
                raise fail
            dec = Cipher(self._cbc_key, modes.CBC(iv)).decryptor()
            pt = dec.update(ct) + dec.finalize()
        if not pt:
            raise fail
        pad = pt[-1]
        if pad + 1 > len(pt):
            raise fail
        return pt[: len(pt) - 1 - pad]


# -- Diffie-Hellman ----------------------------------------------------------------------

_MODP2048 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16)

_MODP3072 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64"
    "ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7ABF5AE8CDB0933D71E8C94E04A25619DCEE3D226"
    "1AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16)

_MODP = {Group.MODP2048: _MODP2048, Group.MODP3072: _MODP3072}
_MODP_PARAMS: dict[int, dh.DHParameters] = {}
_CURVES = {Group.ECP256: (ec.SECP256R1, 32), Group.ECP384: (ec.SECP384R1, 48)}
_ECP_P = {
    Group.ECP256: 2**256 - 2**224 + 2**192 + 2**96 - 1,
    Group.ECP384: 2**384 - 2**128 - 2**96 + 2**32 - 1,
}

KE_LEN = {Group.MODP2048: 256, Group.MODP3072: 384, Group.ECP256: 64, Group.ECP384: 96,
          Group.CURVE25519: 32}
SUPPORTED_GROUPS = tuple(KE_LEN)


class DhKey:
    """An ephemeral Diffie-Hellman key of one group; `public` is the KE payload data."""

    __slots__ = ("_priv", "group", "public")

    def __init__(self, group: int) -> None:
        self.group = group
        if group == Group.CURVE25519:
            self._priv = x25519.X25519PrivateKey.generate()
            self.public = self._priv.public_key().public_bytes_raw()
        elif group in _CURVES:
            curve, n = _CURVES[group]
            self._priv = ec.generate_private_key(curve())
            nums = self._priv.public_key().public_numbers()
            self.public = nums.x.to_bytes(n, "big") + nums.y.to_bytes(n, "big")
        elif group in _MODP:
            params = _MODP_PARAMS.get(group)
            if params is None:
                params = _MODP_PARAMS[group] = dh.DHParameterNumbers(_MODP[group], 2).parameters()
            self._priv = params.generate_private_key()
            y = self._priv.public_key().public_numbers().y
            self.public = y.to_bytes(KE_LEN[group], "big")
        else:
            raise ValueError(f"unsupported Diffie-Hellman group {group}")

    def __repr__(self) -> str:
        return f"<DhKey group={self.group}>"

    def shared(self, peer: bytes) -> bytes:
        """The shared secret with the peer's public value, after the RFC 6989 checks.

        Raises ProtocolError (INVALID_SYNTAX) for a public value that fails them.
        """
        bad = ProtocolError("peer's Diffie-Hellman public value rejected",
                            notify=Notify.INVALID_SYNTAX)
        g = self.group
        if len(peer) != KE_LEN[g]:
            raise bad
        try:
            if g == Group.CURVE25519:
                secret = self._priv.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
                if not any(secret):  # RFC 8031 §2: a low-order point gives all zeros
                    raise bad
                return secret
            if g in _CURVES:
                curve, n = _CURVES[g]
                x, y = int.from_bytes(peer[:n], "big"), int.from_bytes(peer[n:], "big")
                if x >= _ECP_P[g] or y >= _ECP_P[g]:  # RFC 6989 §2.3 (the curve check
                    raise bad                          # is from_encoded_point's)
                pub = ec.EllipticCurvePublicKey.from_encoded_point(curve(), b"\x04" + peer)
                return self._priv.exchange(ec.ECDH(), pub)
            p = _MODP[g]
            y = int.from_bytes(peer, "big")
            if not 1 < y < p - 1:  # RFC 6989 §2.1 (safe primes: no subgroup check needed)
                raise bad
            pub = dh.DHPublicNumbers(y, _MODP_PARAMS[g].parameter_numbers()).public_key()
            secret = self._priv.exchange(pub)
            return secret.rjust(KE_LEN[g], b"\0")
        except ProtocolError:
            raise
        except ValueError:
            raise bad from None
