"""IKEv2 for `vxlanipsec` tunnels keyed with `options:psk` (or certificates) in espswitchd.

One `IkeCore` serves every IKE-keyed tunnel of the daemon. Its UDP sockets (ports 500 and
4500, bound to the wildcard address of the hypervisor's namespace, with IP_PKTINFO to learn
and choose the local address) belong to the kernel stack: IKE packets reach it through the
bridge's internal port, as any non-tunnel traffic to `local_ip` does, and leave through it.
The sockets and the core's next deadline join the daemon's control-plane poll (`wait`), and
`run` does the work: no thread, no second event loop.

Each IKE-keyed port becomes one peer of the core, named after the interface. The core's
events drive the port (`install_child`, `remove_child`, `remove_all_children`); the port
never does I/O for IKE. Keys and PSKs are never logged, shown or put in an error.

Certificates that cannot be used (an `other_config:certificate`, `private_key` or `ca_cert`,
or an `options:remote_cert`, that is missing, unreadable or does not parse) are a
configuration error: `screen` takes such tunnels out of the reconfiguration with one
sentence for `Interface.error`, and the files are looked at again every second so that
repairing (or breaking) one takes effect without a database change. What goes wrong while
running (a socket, a negotiation, a dead peer) stays in `status:ike_error`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import ovs.poller
import ovs.vlog

from espswitch.datapath.errors import PortError
from espswitch.datapath.tunnel import ip4_str
from espswitch.datapath.tunnel_port import VxlanIpsecPort
from espswitch.ike import (
    ChildConfig,
    ChildSaDeleted,
    ChildSaExpired,
    ChildSaInstalled,
    Credentials,
    Identity,
    IkeCore,
    IkeError,
    IkeSaDown,
    IkeSaUp,
    PeerConfig,
)
from espswitch.ike.options import IkeKeying, parse_ipsec_options
from espswitch.ike.ts import single_host
from espswitch.ipsec.errors import IpsecConfigError
from espswitch.ipsec.sa import Lifetime
from espswitch.vswitchd import unixctl
from espswitch.vswitchd.config import Desired, IfaceConfig

if TYPE_CHECKING:
    from espswitch.datapath import Datapath
    from espswitch.vswitchd.daemon import Switchd

vlog = ovs.vlog.Vlog("ike")

IKE_PORT = 500
NAT_T_PORT = 4500
IP_PKTINFO = 8  # <linux/in.h>; Python's socket module does not export it
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
CHILD_LINGER = 2.0  # seconds a deleted CHILD_SA's inbound SA still opens packets
RETRY = 10.0  # seconds between attempts while a tunnel has no IKE SA
RECV_BATCH = 64
# A liveness check unanswered for dpd_delay seconds, and at least this long, means the
# peer is dead (it is retransmitted meanwhile).
DPD_TIMEOUT_MIN = 10.0
CERT_CHECK = 1.0  # seconds between looks at the files of certificate-keyed tunnels
CERT_MAX_BYTES = 1 << 20  # a certificate or key file larger than this is refused
CERT_OPTIONS = ("certificate", "private_key", "ca_cert")


def bind_wildcard(port: int) -> socket.socket:
    """A non-blocking UDP socket on 0.0.0.0:`port` that reports each datagram's destination."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


@dataclass
class _Peer:
    """One IKE-keyed port as the core knows it."""

    cfg: PeerConfig
    port: VxlanIpsecPort
    local_ip: bytes
    next_try: float = 0.0
    last_error: str | None = None
    # rekey_packets/rekey_bytes, and the outbound SPI whose volume rekey was started
    soft: Lifetime = field(default_factory=Lifetime)
    rekey_asked: int | None = None


class IkeManager:
    """The daemon's IKE layer: one core, its sockets, and the ports it keys."""

    def __init__(self, dp: Datapath, *, on_change: Callable[[], None] | None = None,
                 bind: Callable[[int], socket.socket] = bind_wildcard,
                 other_config: Callable[[], dict[str, str]] | None = None,
                 on_stale: Callable[[], None] | None = None) -> None:
        self.dp = dp
        # Certificates are checked against the wall clock (their validity periods).
        self.core = IkeCore([], wallclock=lambda: datetime.datetime.now(datetime.UTC))
        self.peers: dict[str, _Peer] = {}
        self.sockets: dict[int, socket.socket] = {}
        self.on_change = on_change or (lambda: None)
        # Called when `screen` would now decide differently (a certificate file changed):
        # the daemon reconfigures again.
        self.on_stale = on_stale or (lambda: None)
        self._bind = bind
        self._other_config = other_config or dict
        self._bind_error: str | None = None
        self._next_bind = 0.0
        self._changed = False
        self.bugs = 0
        self._oc_key: tuple = ()
        # Loaded credentials (or the error) by their paths, with the files' stat results
        # when loaded; each load bumps the epoch.
        self._certs: dict[tuple, tuple[tuple, tuple[Credentials, Identity | None] | str]] = {}
        self._cert_epoch = 0
        # Certificate-keyed interfaces `screen` saw: name -> options:remote_cert, and the
        # error it gave each (None: usable).
        self._screened: dict[str, str | None] = {}
        self._screen_errors: dict[str, str | None] = {}
        self._next_cert_check = 0.0

    # -- the daemon's hooks -------------------------------------------------------------------

    def wait(self, poller) -> None:
        """Register the sockets and the next deadline with an ovs.poller-like `poller`."""
        for s in self.sockets.values():
            poller.fd_wait(s.fileno(), ovs.poller.POLLIN)
        deadline = self.next_deadline()
        if deadline is not None:
            poller.timer_wait(max(0, math.ceil((deadline - time.monotonic()) * 1000)))

    def next_deadline(self) -> float | None:
        """When `run` has work to do next (monotonic seconds), or None."""
        times = [p.next_try for p in self.peers.values() if p.port.sa_out is None]
        d = self.core.next_deadline()
        if d is not None:
            times.append(d)
        if self.peers and not self.sockets:
            times.append(self._next_bind)
        if self._screened:
            times.append(self._next_cert_check)
        return min(times, default=None)

    def run(self, now: float | None = None) -> None:
        """Follow the ports, read the sockets, fire timers, retry; never raises (a bug is
        logged: it must not stop the reconfiguration of every other port)."""
        now = time.monotonic() if now is None else now
        try:
            self._run(now)
        except Exception:
            self.bugs += 1
            if self.bugs <= 5 or self.bugs % 100 == 0:
                vlog.exception(f"IKE layer error ({self.bugs} so far)")

    def _run(self, now: float) -> None:
        self._check_certificates(now)
        self.sync(now)
        self._receive(now)
        d = self.core.next_deadline()
        if d is not None and d <= now:
            self.core.on_timer(now)
        for name, p in self.peers.items():
            if p.port.sa_out is None and now >= p.next_try:
                p.next_try = now + RETRY
                self._command(self.core.initiate, name, now)
            self._check_volume(name, p, now)
        self._flush(now)

    def close(self) -> None:
        """Close the sockets (the peers learn of our end through DPD)."""
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()

    # -- following the configuration ---------------------------------------------------------

    def sync(self, now: float) -> None:
        """Make the core's peers match the IKE-keyed ports of the datapath."""
        want = {p.name: p for p in self.dp.ports.values()
                if isinstance(p, VxlanIpsecPort) and p.ike is not None}
        oc = self._other_config()
        # Other paths, or files that changed since they were loaded (`_cert_epoch`).
        oc_key = (*(oc.get(k) for k in CERT_OPTIONS), self._cert_epoch)
        certs_changed, self._oc_key = oc_key != self._oc_key, oc_key
        # One IKE peer per remote endpoint: its leader, the tunnel that already leads or else
        # the first by name; the other tunnels to that endpoint (other VNIs) follow it and
        # share its IKE SA and CHILD_SA.
        groups: dict[bytes, list[str]] = {}
        for name in sorted(want):
            groups.setdefault(want[name].remote_ip, []).append(name)
        leads: dict[str, list[str]] = {}
        for names in groups.values():
            lead = next((n for n in names if n in self.peers), names[0])
            leads[lead] = [n for n in names if n != lead]
        for name in [n for n in self.peers if n not in leads]:
            self._drop(name, now)
        for name in leads:
            port = want[name]
            p = self.peers.get(name)
            if p is not None and p.port is port and p.local_ip == port.local_ip and not (
                    certs_changed and p.cfg.credentials.uses_certs):
                continue
            if port.local_ip is None:
                if p is not None:
                    self._drop(name, now)
                port.ike_error = port.route_problem or "no local_ip: no route to remote_ip"
                continue
            try:
                cfg = self._peer_config(port)
            except (IkeError, PortError, OSError, ValueError) as e:
                if p is not None:
                    self._drop(name, now)
                if port.ike_error != str(e):
                    vlog.warn(f"{name}: {e}")
                port.ike_error = str(e)
                continue
            if p is not None and p.cfg == cfg:
                # The same tunnel in a new port object (another option changed): its SAs
                # move over with their sequence numbers and replay windows.
                old, p.port, p.local_ip = p.port, port, port.local_ip
                p.soft = Lifetime(packets=port.ike.rekey_packets, bytes=port.ike.rekey_bytes)
                if old is not port:
                    self._move_children(old, port)
                continue
            if p is not None:
                self._drop(name, now)
            self.core.add_peer(cfg)
            ike = port.ike
            soft = Lifetime(packets=ike.rekey_packets, bytes=ike.rekey_bytes)
            self.peers[name] = _Peer(cfg=cfg, port=port, local_ip=port.local_ip, soft=soft)
            vlog.info(f"{name}: IKEv2 with {cfg.remote_addr} from {cfg.local_addr} "
                      f"({'certificates' if cfg.credentials.uses_certs else 'PSK'}, "
                      f"ike={cfg.ike_proposals}, esp={ike.esp}, mode={port.mode})")
            self._changed = True
        self._link_followers(want, leads)
        self._update_sockets(now)

    def _link_followers(self, want: dict[str, VxlanIpsecPort],
                        leads: dict[str, list[str]]) -> None:
        """Point each follower at its leader when their IKE settings agree; a follower
        whose settings differ stays `connecting`, with the reason in status:ike_error."""
        for lead, names in leads.items():
            leader = want[lead]
            leader.follow(None)
            leader.followers = {}
            p = self.peers.get(lead)
            for name in names:
                port = want[name]
                port.followers = {}
                error = self._follow_error(port, leader, p)
                if error is None:
                    port.follow(leader)
                    leader.followers[port.vni] = port
                    if port.ike_error is not None:
                        port.ike_error = None
                        self._changed = True
                    continue
                port.follow(None)
                if port.ike_error != error:
                    vlog.warn(f"{name}: {error}")
                    port.ike_error = error
                    self._changed = True

    def _follow_error(self, port: VxlanIpsecPort, leader: VxlanIpsecPort,
                      p: _Peer | None) -> str | None:
        """Why `port` cannot share the IKE SA of `leader` (same remote_ip), or None."""
        lead = leader.name
        if p is None or p.port is not leader:
            return f"shares remote_ip with IKE-keyed interface {lead}, which is not keyed"
        if port.local_ip != leader.local_ip or port.dst_port != leader.dst_port:
            return (f"shares remote_ip with IKE-keyed interface {lead} but not its local_ip "
                    "and dst_port")
        try:
            cfg = self._peer_config(port)
        except (IkeError, PortError, OSError, ValueError) as e:
            return str(e)
        if replace(cfg, name=p.cfg.name) != p.cfg:
            return (f"shares remote_ip with IKE-keyed interface {lead}, whose IKE and ESP "
                    "options (psk or certificates, ike, esp, ipsec_mode, rekey and dpd "
                    "settings, ipsec_encapsulation) differ: one IKE SA keys both, so they "
                    "must agree")
        return None

    def _peer_config(self, port: VxlanIpsecPort) -> PeerConfig:
        ike = port.ike
        local, remote = ip4_str(port.local_ip), ip4_str(port.remote_ip)
        child = ChildConfig(
            name="vxlan", mode=str(port.mode), esp_proposals=ike.esp,
            # UDP between the two endpoints, any ports: one CHILD_SA must carry VXLAN both
            # ways, and each side's VXLAN source port is a hash of the inner flow. The
            # datapath narrows what it accepts to UDP to dst_port after decryption.
            local_ts="dynamic[udp]", remote_ts="dynamic[udp]",
            rekey_time=ike.rekey_time)
        if ike.psk is not None:
            creds = Credentials(psk=ike.psk)
            local_id, remote_id = local, ike.remote_name or remote
        else:
            creds, remote_subject = self._cert_credentials(port)
            local_id = _subject_of(creds.cert)
            remote_id = ike.remote_name or remote_subject
        return PeerConfig(
            name=port.name, local_addr=local, remote_addr=remote, credentials=creds,
            local_id=local_id, remote_id=remote_id, ike_proposals=ike.ike,
            children=(child,), ike_rekey_time=ike.ike_rekey_time, dpd_delay=ike.dpd_delay,
            dpd_timeout=max(ike.dpd_delay, DPD_TIMEOUT_MIN), encap=port.encap)

    def _cert_credentials(self, port: VxlanIpsecPort) -> tuple[Credentials, Identity | None]:
        return self._credentials(self._other_config(), port.ike.remote_cert)

    def _credentials(self, oc: dict[str, str],
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
            self._cert_epoch += 1
        if isinstance(got, str):
            raise PortError(got)
        return got

    # -- certificate problems are configuration errors -----------------------------------------

    def screen(self, desired: Desired) -> Desired:
        """`desired` without the certificate-keyed tunnels whose certificates cannot be used:
        each goes to `errors` (Interface.error) instead, as a bad option would, so the port
        is not created (or is deleted). Called by the daemon on each reconfiguration."""
        oc = self._other_config()
        self._screened, errors = {}, {}
        used = set()
        for name, cfg in desired.ifaces.items():
            cert_keyed, remote_cert = _certificate_keyed(cfg)
            if not cert_keyed:
                continue
            self._screened[name] = remote_cert
            used.add((*(oc.get(k) or None for k in CERT_OPTIONS), remote_cert))
            try:
                self._credentials(oc, remote_cert)
            except PortError as e:
                errors[name] = f"interface {name}: {e}"
                if self._screen_errors.get(name) != errors[name]:
                    vlog.warn(errors[name])
        self._certs = {k: v for k, v in self._certs.items() if k in used}
        self._screen_errors = {n: errors.get(n) for n in self._screened}
        self._next_cert_check = time.monotonic() + CERT_CHECK
        if not errors:
            return desired
        return replace(desired, ifaces={n: c for n, c in desired.ifaces.items()
                                        if n not in errors},
                       errors={**desired.errors, **errors})

    def _check_certificates(self, now: float) -> None:
        """Every CERT_CHECK seconds: would `screen` now decide otherwise for a tunnel (a file
        or other_config changed)? Then ask the daemon to reconfigure."""
        if not self._screened or now < self._next_cert_check:
            return
        self._next_cert_check = now + CERT_CHECK
        oc = self._other_config()
        for name, remote_cert in self._screened.items():
            try:
                self._credentials(oc, remote_cert)
                error = None
            except PortError as e:
                error = f"interface {name}: {e}"
            if error != self._screen_errors.get(name):
                vlog.info(f"{name}: certificates changed, reconfiguring")
                self.on_stale()
                return

    def _drop(self, name: str, now: float) -> None:
        p = self.peers.pop(name)
        self._command(self.core.remove_peer, name, now)
        p.port.remove_all_children()
        vlog.info(f"{name}: IKE peer {p.cfg.remote_addr} removed")
        self._changed = True

    def _move_children(self, old: VxlanIpsecPort, new: VxlanIpsecPort) -> None:
        for sa_out, sa_in in old.child_sas():
            if sa_out.expired or sa_in.expired:
                continue
            old.release_child(sa_in.spi)
            try:
                new.adopt_child(sa_out, sa_in)
            except PortError as e:
                vlog.warn(f"{new.name}: {e}")

    def _update_sockets(self, now: float) -> None:
        if not self.peers:
            if self.sockets:
                self.close()
            return
        if self.sockets or now < self._next_bind:
            return
        try:
            for port in (IKE_PORT, NAT_T_PORT):
                self.sockets[port] = self._bind(port)
        except OSError as e:
            self.close()
            self._next_bind = now + RETRY
            msg = f"cannot bind UDP port {port} for IKE: {e.strerror or e}"
            if msg != self._bind_error:
                vlog.err(msg)
            self._bind_error = msg
            for p in self.peers.values():
                p.port.ike_error = msg
            return
        self._bind_error = None

    # -- I/O --------------------------------------------------------------------------------

    def _receive(self, now: float) -> None:
        for lport, s in self.sockets.items():
            for _ in range(RECV_BATCH):
                try:
                    data, anc, _flags, src = s.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO.size))
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # an ICMP error on the socket and the like
                    vlog.dbg(f"UDP {lport}: {e}")
                    continue
                dst = None
                for level, kind, cdata in anc:
                    if level == socket.IPPROTO_IP and kind == IP_PKTINFO and \
                            len(cdata) >= _PKTINFO.size:
                        dst = socket.inet_ntoa(_PKTINFO.unpack_from(cdata)[2])
                if dst is None:
                    continue
                self.core.receive_datagram(data, src=src, dst=(dst, lport), now=now)
                self._flush(now)

    def _flush(self, now: float) -> None:
        for d in self.core.datagrams_to_send():
            s = self.sockets.get(d.src[1])
            if s is None:
                continue
            info = _PKTINFO.pack(0, socket.inet_aton(d.src[0]), b"\0\0\0\0")
            try:
                s.sendmsg([d.data], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, d.dst)
            except OSError as e:
                self.dp.log_rl(f"IKE: cannot send to {d.dst[0]}:{d.dst[1]}: {e.strerror or e}")
        for ev in self.core.events():
            self._event(ev, now)
        while self.core.errors:
            e = self.core.errors.popleft()
            self.dp.log_rl(f"IKE: {e}")
        if self._changed:
            self._changed = False
            self.on_change()

    def _command(self, fn, name: str, now: float, *args) -> str | None:
        try:
            fn(name, now, *args)
        except IkeError as e:
            return str(e)
        return None

    # -- events -------------------------------------------------------------------------------

    def _event(self, ev, now: float) -> None:
        p = self.peers.get(ev.peer)
        port = p.port if p is not None else None
        if isinstance(ev, IkeSaUp):
            what = " (rekeyed)" if ev.rekey_of is not None else ""
            vlog.info(f"{ev.peer}: IKE SA #{ev.ike_id} established{what} with "
                      f"{ev.remote_addr[0]}, {ev.local_id} <-> {ev.remote_id}, "
                      f"{'initiator' if ev.initiator else 'responder'}"
                      f"{', NAT-T' if ev.nat else ''}")
            if p is not None:
                p.last_error = None
        elif isinstance(ev, IkeSaDown):
            routine = ev.reason.startswith(("deleted", "rekeyed"))
            level = vlog.info if routine else vlog.warn
            level(f"{ev.peer}: IKE SA #{ev.ike_id} down: {ev.reason}")
            if port is not None:
                live = frozenset(c.spi_in for s in self.core.ike_sas(ev.peer)
                                 for c in s.children)
                if port.remove_all_children(keep=live):
                    self._changed = True
                if not port.pairs:
                    p.last_error = port.ike_error = f"IKE SA down: {ev.reason}"
                    p.next_try = min(p.next_try, now + RETRY)
                    self._changed = True
        elif isinstance(ev, ChildSaInstalled):
            vlog.info(f"{ev.peer}: CHILD_SA installed, spi_in 0x{ev.spi_in:08x} spi_out "
                      f"0x{ev.spi_out:08x}, {ev.transform} {ev.mode}"
                      f"{', UDP-encapsulated' if ev.encap else ''}"
                      + (f" (rekey of 0x{ev.rekey_of:08x})" if ev.rekey_of else ""))
            if port is None:
                return
            window = port.ike.replay_window
            out = ev.outbound_params()
            inb = ev.inbound_params(replay_window=window)
            try:
                port.install_child(
                    out, inb, encap=ev.encap, rekey=ev.rekey_of is not None,
                    encap_port=ev.remote_addr[1] if ev.encap else None,
                    inner_remote=_ipv4_host(ev.remote_ts))
            except PortError as e:
                vlog.err(f"{ev.peer}: CHILD_SA not installed: {e}")
                return
            self._changed = True
        elif isinstance(ev, ChildSaDeleted | ChildSaExpired):
            reason = ev.reason if isinstance(ev, ChildSaDeleted) else "expired"
            vlog.info(f"{ev.peer}: CHILD_SA spi_in 0x{ev.spi_in:08x} spi_out "
                      f"0x{ev.spi_out:08x} removed: {reason}")
            # After a rekey the peer may still have packets in flight on the old SA.
            if port is not None and port.remove_child(ev.spi_in, linger=CHILD_LINGER):
                self._changed = True

    def _check_volume(self, name: str, p: _Peer, now: float) -> None:
        """rekey_bytes/rekey_packets: once the SA pair in use has carried that much (either
        direction), rekey it, once. Counted here from the options as they are now, so a
        changed option applies to the SAs already installed too."""
        soft, sa_out, sa_in = p.soft, p.port.sa_out, p.port.sa_in
        if sa_out is None or sa_in is None or p.rekey_asked == sa_out.spi:
            return
        due = (soft.packets is not None and max(sa_out.packets, sa_in.packets) >= soft.packets) \
            or (soft.bytes is not None and max(sa_out.bytes, sa_in.bytes) >= soft.bytes)
        if due and self._command(self.core.rekey_child, name, now) is None:
            p.rekey_asked = sa_out.spi

    # -- ovs-appctl ---------------------------------------------------------------------------

    def show(self, name: str | None = None) -> list[dict[str, object]]:
        """The IKE peers and SAs for ike/show: no keys, no PSK."""
        out = []
        for pname in sorted(self.peers):
            if name is not None and pname != name:
                continue
            p = self.peers[pname]
            sas = []
            for s in self.core.ike_sas(pname):
                sas.append({
                    "ike_id": s.ike_id, "state": s.state,
                    "role": "initiator" if s.initiator else "responder",
                    "spi_i": s.spi_i.hex(), "spi_r": s.spi_r.hex(),
                    "peer_id": s.remote_id, "fragmentation": s.fragmentation,
                    "children": [{"name": c.name, "state": c.state,
                                  "spi_in": f"0x{c.spi_in:08x}", "spi_out": f"0x{c.spi_out:08x}",
                                  "esp": c.transform, "mode": c.mode} for c in s.children],
                })
            out.append({
                "interface": pname, "local": p.cfg.local_addr, "remote": p.cfg.remote_addr,
                "followers": sorted(f.name for f in p.port.followers.values()),
                "local_id": str(p.cfg.local_id),
                "remote_id": str(p.cfg.remote_id) if p.cfg.remote_id else "any",
                "auth": "certificates" if p.cfg.credentials.uses_certs else "psk",
                "ike": p.cfg.ike_proposals, "esp": p.port.ike.esp,
                "ipsec_state": p.port.ipsec_state(), "last_error": p.port.ike_error,
                "ike_sas": sas,
            })
        return out

    def _leader_name(self, name: str) -> str:
        """The IKE peer that keys interface `name` (itself, or the leader it follows)."""
        port = self.dp.ports.get(name)
        leader = getattr(port, "leader", None)
        return leader.name if leader is not None else name

    def register_appctl(self) -> None:
        """ike/show [--json] [IFACE] and ike/rekey IFACE [child|ike]."""

        def ike_show(conn, argv, aux) -> None:
            as_json = "--json" in argv
            names = [self._leader_name(a) for a in argv if a != "--json"]
            if names and names[0] not in self.peers:
                conn.reply_error(f"no IKE-keyed vxlanipsec interface named {names[0]}")
                return
            rows = self.show(names[0] if names else None)
            counters = dict(self.core.counters)
            if as_json:
                conn.reply(json.dumps({"peers": rows, "messages": counters}, indent=1) + "\n")
            else:
                conn.reply(_format(rows) + "IKE messages: " + ", ".join(
                    f"{k.replace('_', ' ')} {v}" for k, v in counters.items()) + "\n")

        def ike_rekey(conn, argv, aux) -> None:
            name = self._leader_name(argv[0])
            what = argv[1] if len(argv) > 1 else "child"
            if name not in self.peers:
                conn.reply_error(f"no IKE-keyed vxlanipsec interface named {name}")
                return
            if what not in ("child", "ike"):
                conn.reply_error(f"ike/rekey: say child or ike, not {what!r}")
                return
            now = time.monotonic()
            fn = self.core.rekey_child if what == "child" else self.core.rekey_ike
            err = self._command(fn, name, now)
            self._flush(now)
            if err is not None:
                conn.reply_error(f"{name}: cannot rekey: {err}")
            else:
                conn.reply(f"{name}: {'CHILD_SA' if what == 'child' else 'IKE SA'} rekey "
                           "started\n")

        unixctl.register("ike/show", "[--json] [IFACE]", 0, 2, ike_show)
        unixctl.register("ike/rekey", "IFACE [child|ike]", 1, 2, ike_rekey)


def _ipv4_host(selectors) -> bytes | None:
    """The one IPv4 host the peer's selectors name: its address as it sees itself."""
    addr = single_host(selectors)
    return addr if addr is not None and len(addr) == 4 else None


def _subject_of(cert) -> Identity:
    """The certificate's subject as an ID_DER_ASN1_DN identity."""
    return Identity.of_subject(cert)


def _certificate_keyed(cfg: IfaceConfig) -> tuple[bool, str | None]:
    """(whether the interface is a vxlanipsec tunnel keyed by IKE with certificates, its
    options:remote_cert). Options that do not parse are the port's own error to report."""
    if cfg.type != "vxlanipsec":
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
        remote_subject = _subject_of(_load_cert(remote_cert, "options:remote_cert"))
    return Credentials(cert=mine, key=key, cas=cas, chain=tuple(chain)), remote_subject


def _format(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "no IKE-keyed tunnels\n"
    lines = []
    for r in rows:
        lines.append(f"{r['interface']}: {r['local']} <-> {r['remote']}, {r['auth']}, "
                     f"ids {r['local_id']} <-> {r['remote_id']}, ike={r['ike']} esp={r['esp']}, "
                     f"ipsec_state {r['ipsec_state']}")
        if r["followers"]:
            lines.append(f"  also keys: {', '.join(r['followers'])}")
        if not r["ike_sas"]:
            lines.append(f"  no IKE SA; last error: {r['last_error'] or 'none'}")
        for s in r["ike_sas"]:
            lines.append(f"  IKE SA #{s['ike_id']} {s['state']} ({s['role']}), "
                         f"spi_i {s['spi_i']} spi_r {s['spi_r']}"
                         + (f", peer id {s['peer_id']}" if s["peer_id"] else "")
                         + (", IKE fragmentation" if s["fragmentation"] else ""))
            for c in s["children"]:
                lines.append(f"    CHILD_SA {c['name']} {c['state']}: spi_in {c['spi_in']} "
                             f"spi_out {c['spi_out']}, {c['esp']} {c['mode']}")
    return "\n".join(lines) + "\n"


def attach(sw: Switchd) -> IkeManager:
    """The daemon's IKE layer, with ike/ commands registered and state written back."""

    def other_config() -> dict[str, str]:
        table = sw.idl.tables.get("Open_vSwitch")
        if table is None or "other_config" not in table.columns:
            return {}
        for row in table.rows.values():
            with contextlib.suppress(AttributeError):
                return dict(row.other_config)
        return {}

    def reconfigure() -> None:
        sw.force = True

    mgr = IkeManager(sw.dp, on_change=lambda: sw.write_back(cfg_done=False),
                     other_config=other_config, on_stale=reconfigure)
    mgr.register_appctl()
    return mgr
