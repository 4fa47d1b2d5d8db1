"""Proposals in strongSwan syntax (`aes128gcm16-prfsha256-x25519`, `aes128-sha256-modp2048`,
`aes128gcm16`, `aes128-sha256-x25519-esn`), their SA payload form, and choosing one.
"""

from __future__ import annotations

from dataclasses import dataclass

from espswitch.ike.consts import Encr, Group, Integ, Notify, Prf, Protocol, TransformType
from espswitch.ike.crypto import AEAD_ENCR, SUPPORTED_GROUPS
from espswitch.ike.errors import IkeConfigError, ProtocolError
from espswitch.ike.message import Proposal, Transform

__all__ = ["Chosen", "ProposalSpec", "choose", "parse_proposals"]

_ENCR = {
    "aes128": (Encr.AES_CBC, 128), "aes192": (Encr.AES_CBC, 192), "aes256": (Encr.AES_CBC, 256),
    "aes128gcm16": (Encr.AES_GCM_16, 128), "aes192gcm16": (Encr.AES_GCM_16, 192),
    "aes256gcm16": (Encr.AES_GCM_16, 256), "aes128gcm128": (Encr.AES_GCM_16, 128),
    "aes256gcm128": (Encr.AES_GCM_16, 256), "chacha20poly1305": (Encr.CHACHA20_POLY1305, None),
    "null": (Encr.NULL, None),
}
_INTEG = {
    "sha1": Integ.HMAC_SHA1_96, "sha": Integ.HMAC_SHA1_96,
    "sha256": Integ.HMAC_SHA2_256_128, "sha2_256": Integ.HMAC_SHA2_256_128,
    "sha384": Integ.HMAC_SHA2_384_192, "sha2_384": Integ.HMAC_SHA2_384_192,
    "sha512": Integ.HMAC_SHA2_512_256, "sha2_512": Integ.HMAC_SHA2_512_256,
}
_PRF = {
    "prfsha1": Prf.HMAC_SHA1, "prfsha256": Prf.HMAC_SHA2_256, "prfsha384": Prf.HMAC_SHA2_384,
    "prfsha512": Prf.HMAC_SHA2_512,
}
_INTEG_TO_PRF = {
    Integ.HMAC_SHA1_96: Prf.HMAC_SHA1, Integ.HMAC_SHA2_256_128: Prf.HMAC_SHA2_256,
    Integ.HMAC_SHA2_384_192: Prf.HMAC_SHA2_384, Integ.HMAC_SHA2_512_256: Prf.HMAC_SHA2_512,
}
_GROUP = {
    "modp2048": Group.MODP2048, "modp3072": Group.MODP3072, "ecp256": Group.ECP256,
    "ecp384": Group.ECP384, "x25519": Group.CURVE25519, "curve25519": Group.CURVE25519,
}
# ESP integrity the ESP engine implements, and its name there.
_ESP_INTEG_NAME = {Integ.HMAC_SHA1_96: "sha1", Integ.HMAC_SHA2_256_128: "sha256"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProposalSpec:
    """One configured proposal: the acceptable algorithms of each transform type."""

    protocol: int
    encr: tuple[tuple[int, int | None], ...]
    integ: tuple[int, ...] = ()
    prf: tuple[int, ...] = ()
    dh: tuple[int, ...] = ()
    esn: tuple[int, ...] = ()

    def to_proposal(self, num: int, spi: bytes, *, first_group: int | None = None) -> Proposal:
        """The SA payload form; `first_group` is moved first (the group of our KE)."""
        ts: list[Transform] = [Transform(type=TransformType.ENCR, id=e, key_length=k)
                               for e, k in self.encr]
        ts += [Transform(type=TransformType.PRF, id=p) for p in self.prf]
        ts += [Transform(type=TransformType.INTEG, id=i) for i in self.integ]
        groups = list(self.dh)
        if first_group in groups:
            groups.remove(first_group)
            groups.insert(0, first_group)
        ts += [Transform(type=TransformType.DH, id=g) for g in groups]
        ts += [Transform(type=TransformType.ESN, id=x) for x in self.esn]
        return Proposal(num=num, protocol=self.protocol, spi=spi, transforms=tuple(ts))


@dataclass(frozen=True, slots=True, kw_only=True)
class Chosen:
    """One algorithm of each type, as agreed; `spi` is the peer's SPI from its proposal."""

    protocol: int
    encr: int
    key_bits: int | None
    integ: int = Integ.NONE
    prf: int = 0
    dh: int = Group.NONE
    esn: bool = False
    spi: bytes = b""
    num: int = 1

    def to_proposal(self, spi: bytes) -> Proposal:
        """The one-proposal SA payload form of this choice, with our `spi`."""
        ts = [Transform(type=TransformType.ENCR, id=self.encr, key_length=self.key_bits)]
        if self.prf:
            ts.append(Transform(type=TransformType.PRF, id=self.prf))
        if self.integ:
            ts.append(Transform(type=TransformType.INTEG, id=self.integ))
        if self.dh:
            ts.append(Transform(type=TransformType.DH, id=self.dh))
        if self.protocol == Protocol.ESP:
            ts.append(Transform(type=TransformType.ESN, id=int(self.esn)))
        return Proposal(num=self.num, protocol=self.protocol, spi=spi, transforms=tuple(ts))

    @property
    def esp_transform_name(self) -> str:
        """The ESP engine's transform name (`espswitch.ipsec.parse_transform`)."""
        if self.encr == Encr.AES_GCM_16:
            name = f"aes{self.key_bits}gcm16"
        elif self.encr == Encr.CHACHA20_POLY1305:
            name = "chacha20poly1305"
        elif self.encr == Encr.AES_CBC:
            name = f"aes{self.key_bits}-{_ESP_INTEG_NAME[self.integ]}"
        else:
            name = f"null-{_ESP_INTEG_NAME[self.integ]}"
        return name + ("-esn" if self.esn else "")


def parse_proposals(text: str, protocol: int) -> tuple[ProposalSpec, ...]:
    """Parse comma-separated strongSwan proposals for IKE or ESP; IkeConfigError if bad."""
    specs = []
    for one in text.split(","):
        one = one.strip().lower()
        if not one:
            continue
        encr, integ, prfs, dhs, esn = [], [], [], [], []
        for tok in one.split("-"):
            if tok in _ENCR:
                encr.append(_ENCR[tok])
            elif tok in _INTEG:
                integ.append(_INTEG[tok])
            elif tok in _PRF and protocol == Protocol.IKE:
                prfs.append(_PRF[tok])
            elif tok in _GROUP:
                dhs.append(_GROUP[tok])
            elif tok in ("esn", "noesn") and protocol == Protocol.ESP:
                esn.append(1 if tok == "esn" else 0)
            else:
                raise IkeConfigError(f"unknown algorithm {tok!r} in proposal {one!r}")
        if not encr:
            raise IkeConfigError(f"proposal {one!r} names no encryption algorithm")
        aead = all(e in AEAD_ENCR for e, _ in encr)
        if any(e in AEAD_ENCR for e, _ in encr) and not aead:
            raise IkeConfigError(f"proposal {one!r} mixes AEAD and non-AEAD algorithms")
        if aead and integ:
            raise IkeConfigError(f"proposal {one!r}: AEAD algorithms take no integrity")
        if not aead and not integ:
            raise IkeConfigError(f"proposal {one!r} needs an integrity algorithm")
        if protocol == Protocol.IKE:
            if any(e == Encr.NULL for e, _ in encr):
                raise IkeConfigError("IKE cannot use null encryption")
            if not prfs:
                if not integ:
                    raise IkeConfigError(f"proposal {one!r} needs a PRF (e.g. prfsha256)")
                prfs = [_INTEG_TO_PRF[i] for i in integ]
            if not dhs:
                raise IkeConfigError(f"proposal {one!r} needs a Diffie-Hellman group")
        else:
            if any(i not in _ESP_INTEG_NAME for i in integ):
                raise IkeConfigError(f"ESP proposal {one!r}: integrity must be sha1 or sha256")
            if any(e == Encr.AES_CBC and k == 192 for e, k in encr):
                raise IkeConfigError(f"ESP proposal {one!r}: aes192 is not supported")
            esn = esn or [0]
        specs.append(ProposalSpec(protocol=protocol, encr=tuple(encr), integ=tuple(integ),
                                  prf=tuple(prfs), dh=tuple(dhs), esn=tuple(esn)))
    if not specs:
        raise IkeConfigError("empty proposal")
    return tuple(specs)


def _by_type(p: Proposal) -> dict[int, list[Transform]]:
    out: dict[int, list[Transform]] = {}
    for t in p.transforms:
        out.setdefault(t.type, []).append(t)
    return out


def choose(offered: tuple[Proposal, ...], ours: tuple[ProposalSpec, ...], *,
           protocol: int, pfs_group: int | None = None, ignore_dh: bool = False) -> Chosen:
    """Pick the first offered proposal that one of ours accepts (the initiator's order).

    For ESP, `pfs_group` None means "no KE payload": only proposals without a group
    (or with NONE) fit; `ignore_dh` (IKE_AUTH, RFC 7296 §1.2) disregards groups.
    Raises ProtocolError(NO_PROPOSAL_CHOSEN) when nothing fits.
    """
    for p in offered:
        if p.protocol != protocol:
            continue
        if protocol == Protocol.IKE and p.spi and len(p.spi) != 8:
            continue
        if protocol == Protocol.ESP and len(p.spi) != 4:
            continue
        bt = _by_type(p)
        if set(bt) - {TransformType.ENCR, TransformType.PRF, TransformType.INTEG,
                      TransformType.DH, TransformType.ESN}:
            continue
        for spec in ours:
            got = _match(bt, spec, protocol, pfs_group, ignore_dh)
            if got is not None:
                encr, kb, integ, prf_id, group, esn = got
                return Chosen(protocol=protocol, encr=encr, key_bits=kb, integ=integ,
                              prf=prf_id, dh=group, esn=bool(esn), spi=p.spi, num=p.num)
    raise ProtocolError("no acceptable proposal", notify=Notify.NO_PROPOSAL_CHOSEN)


def _match(bt: dict[int, list[Transform]], spec: ProposalSpec, protocol: int,
           pfs_group: int | None, ignore_dh: bool) -> tuple | None:
    encr = next(((t.id, t.key_length) for t in bt.get(TransformType.ENCR, ())
                 if (t.id, t.key_length) in spec.encr), None)
    if encr is None:
        return None
    aead = encr[0] in AEAD_ENCR
    offered_integ = [t.id for t in bt.get(TransformType.INTEG, ()) if t.key_length is None]
    if aead:
        if any(i != Integ.NONE for i in offered_integ) and Integ.NONE not in offered_integ:
            return None
        integ = Integ.NONE
    else:
        integ = next((i for i in offered_integ if i in spec.integ), None)
        if integ is None:
            return None
    prf_id = 0
    if protocol == Protocol.IKE:
        prf_id = next((t.id for t in bt.get(TransformType.PRF, ()) if t.id in spec.prf), None)
        if prf_id is None:
            return None
    offered_dh = [t.id for t in bt.get(TransformType.DH, ()) if t.key_length is None]
    if protocol == Protocol.IKE:
        group = next((g for g in offered_dh if g in spec.dh and g in SUPPORTED_GROUPS), None)
        if group is None:
            return None
    elif ignore_dh:
        group = Group.NONE
    elif pfs_group is None:
        if offered_dh and Group.NONE not in offered_dh:
            return None
        if spec.dh:
            return None
        group = Group.NONE
    else:
        if pfs_group not in offered_dh or pfs_group not in spec.dh:
            return None
        group = pfs_group
    esn = 0
    if protocol == Protocol.ESP:
        offered_esn = [t.id for t in bt.get(TransformType.ESN, ())] or [0]
        esn = next((x for x in offered_esn if x in spec.esn), None)
        if esn is None:
            return None
    return encr[0], encr[1], integ, prf_id, group, esn
