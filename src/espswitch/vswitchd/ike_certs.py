"""Certificates of IKE-keyed tunnels for espswitchd: loading them, and treating files that
cannot be used as configuration errors.

An `other_config:certificate`, `private_key` or `ca_cert`, or an `options:remote_cert`,
that is missing, unreadable or does not parse takes its tunnels out of the reconfiguration
with one sentence for `Interface.error` (`Certificates.screen`), and the files are looked
at again every second so that repairing (or breaking) one takes effect without a database
change (`Certificates.check`). Loaded credentials are kept by path and file status, so an
unchanged file gives the same objects (and an unchanged peer config compares equal).
Never a file's contents in an error.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import replace

import ovs.vlog

from espswitch.datapath.errors import PortError
from espswitch.ike import Credentials, Identity, IkeError
from espswitch.ike.options import IkeKeying, parse_ipsec_options
from espswitch.ipsec.errors import IpsecConfigError
from espswitch.vswitchd.config import Desired, IfaceConfig

__all__ = ["CERT_OPTIONS", "Certificates", "load_certificates", "subject_of"]

vlog = ovs.vlog.Vlog("ike")

CERT_CHECK = 1.0  # seconds between looks at the files of certificate-keyed tunnels
CERT_MAX_BYTES = 1 << 20  # a certificate or key file larger than this is refused
CERT_OPTIONS = ("certificate", "private_key", "ca_cert")


class Certificates:
    """The credentials of certificate-keyed tunnels, loaded from the files `other_config()`
    (Open_vSwitch other_config) and options:remote_cert name; `on_stale()` is called when
    `screen` would now decide differently (a file changed): the daemon reconfigures."""

    def __init__(self, other_config: Callable[[], dict[str, str]],
                 on_stale: Callable[[], None]) -> None:
        self.other_config = other_config
        self.on_stale = on_stale
        # Loaded credentials (or the error) by their paths, with the files' stat results
        # when loaded; each load bumps the epoch.
        self._certs: dict[tuple, tuple[tuple, tuple[Credentials, Identity | None] | str]] = {}
        self.epoch = 0
        # Certificate-keyed interfaces `screen` saw: name -> options:remote_cert, and the
        # error it gave each (None: usable).
        self._screened: dict[str, str | None] = {}
        self._screen_errors: dict[str, str | None] = {}
        self._next_check = 0.0

    def next_deadline(self) -> float | None:
        """When `check` has work to do next, or None."""
        return self._next_check if self._screened else None

    def for_remote(self, remote_cert: str | None) -> tuple[Credentials, Identity | None]:
        """Our credentials and the subject of `remote_cert`, by today's other_config."""
        return self.credentials(self.other_config(), remote_cert)

    def credentials(self, oc: dict[str, str],
                    remote_cert: str | None) -> tuple[Credentials, Identity | None]:
        """`load_certificates`, loaded again only when a path or a file's stat changed (the
        same objects otherwise, so an unchanged peer config compares equal). PortError."""
        paths = (*(oc.get(k) or None for k in CERT_OPTIONS), remote_cert)
        stamps = tuple(_stamp(p) for p in paths if p)
        entry = self._certs.get(paths)
        if entry is not None and entry[0] == stamps:
            got = entry[1]
        else:
            try:
                got = load_certificates(oc, remote_cert)
            except (PortError, IkeError, ValueError) as e:
                got = str(e)
            self._certs[paths] = (stamps, got)
            self.epoch += 1
        if isinstance(got, str):
            raise PortError(got)
        return got

    def screen(self, desired: Desired) -> Desired:
        """`desired` without the certificate-keyed tunnels whose certificates cannot be used:
        each goes to `errors` (Interface.error) instead, as a bad option would, so the port
        is not created (or is deleted). Called by the daemon on each reconfiguration."""
        oc = self.other_config()
        self._screened, errors = {}, {}
        used = set()
        for name, cfg in desired.ifaces.items():
            cert_keyed, remote_cert = _certificate_keyed(cfg)
            if not cert_keyed:
                continue
            self._screened[name] = remote_cert
            used.add((*(oc.get(k) or None for k in CERT_OPTIONS), remote_cert))
            try:
                self.credentials(oc, remote_cert)
            except PortError as e:
                errors[name] = f"interface {name}: {e}"
                if self._screen_errors.get(name) != errors[name]:
                    vlog.warn(errors[name])
        self._certs = {k: v for k, v in self._certs.items() if k in used}
        self._screen_errors = {n: errors.get(n) for n in self._screened}
        self._next_check = time.monotonic() + CERT_CHECK
        if not errors:
            return desired
        return replace(desired, ifaces={n: c for n, c in desired.ifaces.items()
                                        if n not in errors},
                       errors={**desired.errors, **errors})

    def check(self, now: float) -> None:
        """Every CERT_CHECK seconds: would `screen` now decide otherwise for a tunnel (a file
        or other_config changed)? Then ask the daemon to reconfigure."""
        if not self._screened or now < self._next_check:
            return
        self._next_check = now + CERT_CHECK
        oc = self.other_config()
        for name, remote_cert in self._screened.items():
            try:
                self.credentials(oc, remote_cert)
                error = None
            except PortError as e:
                error = f"interface {name}: {e}"
            if error != self._screen_errors.get(name):
                vlog.info(f"{name}: certificates changed, reconfiguring")
                self.on_stale()
                return


#: The interface types IKE may key (the others with IPsec options only when keyed).
IKE_TUNNEL_TYPES = frozenset({"vxlanipsec", "vxlan", "geneve", "gre"})


def subject_of(cert) -> Identity:
    """The certificate's subject as an ID_DER_ASN1_DN identity."""
    return Identity.of_subject(cert)


def _certificate_keyed(cfg: IfaceConfig) -> tuple[bool, str | None]:
    """(whether the interface is a tunnel keyed by IKE with certificates, its
    options:remote_cert): `vxlanipsec`, or `vxlan`, `geneve`, `gre` with IPsec options.
    Options that do not parse are the port's own error to report."""
    if cfg.type not in IKE_TUNNEL_TYPES:
        return False, None
    try:
        keying = parse_ipsec_options(dict(cfg.options))
    except IpsecConfigError:
        return False, None
    if not isinstance(keying, IkeKeying) or keying.psk is not None:
        return False, None
    return True, keying.remote_cert


def _stamp(path: str) -> tuple:
    """What changes when the file at `path` does (or its error when there is none)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return (e.errno,)
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _shown(path: str) -> str:
    """A path as an error sentence shows it: as is, or quoted if it would break the line."""
    return path if path.isprintable() else repr(path)


def _read_pem(path: str, what: str) -> bytes:
    """The bytes of a PEM file named by `what` (an option); PortError naming both."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise PortError(f"cannot read {what} {_shown(path)}: not a regular file")
        if st.st_size > CERT_MAX_BYTES:
            raise PortError(f"{what} {_shown(path)} is too large for a PEM file")
        with open(path, "rb") as f:
            return f.read(CERT_MAX_BYTES + 1)
    except OSError as e:
        raise PortError(f"cannot read {what} {_shown(path)}: {e.strerror or e}") from None


def _load_certs(path: str, what: str) -> list:
    """Every certificate of a PEM file (at least one), in the file's order."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(_read_pem(path, what))
    except ValueError:
        raise PortError(f"{what} {_shown(path)} is not a PEM certificate") from None


def _load_cert(path: str, what: str):
    return _load_certs(path, what)[0]


def load_certificates(oc: dict[str, str],
                      remote_cert: str | None) -> tuple[Credentials, Identity | None]:
    """Our certificate and key and the trusted CAs (Open_vSwitch other_config), and the
    subject of options:remote_cert, if given. Raises PortError: one sentence naming the
    option and the path, never the files' contents.

    The certificate file may hold, after our certificate, the intermediate CA certificates
    between it and the peer's trust anchor (a full chain, as many CAs hand it out): they
    are sent along with ours. Every certificate of the ca_cert file is a trust anchor."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    need = [k for k in ("certificate", "private_key") if not oc.get(k)]
    if need:
        raise PortError(
            f"certificates need Open_vSwitch other_config:{' and other_config:'.join(need)}"
            f" (ovs-vsctl set Open_vSwitch . other_config:{need[0]}=PATH)")
    ca_path = oc.get("ca_cert") or remote_cert
    if not ca_path:
        raise PortError("options:remote_name needs Open_vSwitch other_config:ca_cert "
                        "(or options:remote_cert)")
    cert_path, key_path = oc["certificate"], oc["private_key"]
    mine, *chain = _load_certs(cert_path, "other_config:certificate")
    try:
        key = serialization.load_pem_private_key(
            _read_pem(key_path, "other_config:private_key"), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PortError(f"other_config:private_key {_shown(key_path)} is not an unencrypted "
                        "PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PortError(f"other_config:private_key {_shown(key_path)} is neither an RSA nor "
                        "an ECDSA key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != mine.public_key().public_bytes(*spki):
        raise PortError(f"other_config:private_key {_shown(key_path)} is not the key of "
                        f"other_config:certificate {_shown(cert_path)}")
    what = "other_config:ca_cert" if oc.get("ca_cert") else "options:remote_cert"
    cas = tuple(_load_certs(ca_path, what))
    remote_subject = None
    if remote_cert:
        remote_subject = subject_of(_load_cert(remote_cert, "options:remote_cert"))
    return Credentials(cert=mine, key=key, cas=cas, chain=tuple(chain)), remote_subject
