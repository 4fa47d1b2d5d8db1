"""IKEv2 for tunnels (`vxlanipsec`, `vxlan`, `geneve`, `gre`) keyed with `options:psk` or
certificates (`remote_cert`, `remote_name`) in espswitchd.

One `IkeCore` serves every IKE-keyed tunnel of the daemon. Its UDP sockets (ports 500 and
4500 of each address family that a tunnel's underlay uses, bound to the wildcard address
of the hypervisor's namespace, with IP_PKTINFO / IPV6_PKTINFO to learn and choose the local
address: `espswitch.ike.driver.IkeSockets`) belong to the kernel stack: IKE packets reach
it through the bridge's internal port, as any non-tunnel traffic to `local_ip` does (the
tunnel layer takes only ESP, and UDP/4500 that is ESP, not IKE's non-ESP marker), and leave
through it, the kernel resolving the next hop by ARP or neighbour discovery through that
port. IPv4 and IPv6 underlays work alike. The sockets and the core's next deadline join the
daemon's control-plane poll (`wait`), and `run` does the work: no thread, no second event
loop.

`IkeManager` puts together the parts, each in its own module:

- `ike_peers.py` (`PeerSync`): one core peer per remote endpoint, named after its leading
  interface, and the followers that share its SAs;
- `ike_certs.py` (`Certificates`): loading certificates; unusable ones are
  `Interface.error`, and their files are looked at again every second;
- `espswitch.ike.driver` (`IkeSockets`): the sockets, read and written here in the poll loop;
- `ike_events.py` (`PortEvents`): the core's events applied to the ports (`install_child`,
  `remove_child`, ...), and the volume rekeys;
- `ike_appctl.py` (`IkeAppctl`): ike/show and ike/rekey.

The port never does I/O for IKE. Keys and PSKs are never logged, shown or put in an error.
What goes wrong while running (a socket, a negotiation, a dead peer) stays in
`status:ike_error`.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import ovs.poller
import ovs.vlog

from espswitch.ike import IkeCore
from espswitch.ike.consts import IKE_PORT, NAT_T_PORT
from espswitch.ike.driver import RECV_BATCH, IkeSockets, SockKey, bind_wildcard, family_of
from espswitch.vswitchd.config import Desired
from espswitch.vswitchd.ike_appctl import IkeAppctl
from espswitch.vswitchd.ike_certs import Certificates, load_certificates
from espswitch.vswitchd.ike_events import PortEvents
from espswitch.vswitchd.ike_peers import RETRY, IkePeer, PeerSync, command

if TYPE_CHECKING:
    from espswitch.datapath import Datapath
    from espswitch.vswitchd.daemon import Switchd

# bind_wildcard and load_certificates moved (to the driver, to ike_certs.py) and stay here.
__all__ = ["IkeManager", "attach", "bind_wildcard", "load_certificates"]

vlog = ovs.vlog.Vlog("ike")


class IkeManager:
    """The daemon's IKE layer: one core, its sockets, and the ports it keys."""

    def __init__(self, dp: Datapath, *, on_change: Callable[[], None] | None = None,
                 bind: Callable[[int, int], socket.socket] = bind_wildcard,
                 other_config: Callable[[], dict[str, str]] | None = None,
                 on_stale: Callable[[], None] | None = None) -> None:
        self.dp = dp
        # Certificates are checked against the wall clock (their validity periods).
        self.core = IkeCore([], wallclock=lambda: datetime.datetime.now(datetime.UTC))
        self.on_change = on_change or (lambda: None)
        # on_stale: called when `screen` would now decide differently (a certificate file
        # changed): the daemon reconfigures again.
        self.certs = Certificates(other_config or dict, on_stale or (lambda: None))
        self.peer_sync = PeerSync(dp, self.core, self.certs)
        self.port_events = PortEvents(self.core, self.peer_sync)
        self.io = IkeSockets(bind, debug=vlog.dbg)
        self.appctl = IkeAppctl(dp, self.core, self.peer_sync, self._flush)
        self._bind_error: str | None = None
        self._next_bind = 0.0
        self.bugs = 0

    @property
    def peers(self) -> dict[str, IkePeer]:
        """The IKE peers by (leading) interface name."""
        return self.peer_sync.peers

    @property
    def sockets(self) -> dict[SockKey, socket.socket]:
        """The bound UDP sockets by (address family, port) (none while no tunnel is
        IKE-keyed)."""
        return self.io.sockets

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
        if self._missing_families():
            times.append(self._next_bind)
        cert_check = self.certs.next_deadline()
        if cert_check is not None:
            times.append(cert_check)
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
        self.certs.check(now)
        self.sync(now)
        self._receive(now)
        d = self.core.next_deadline()
        if d is not None and d <= now:
            self.core.on_timer(now)
        for name, p in self.peers.items():
            if p.port.sa_out is None and now >= p.next_try:
                p.next_try = now + RETRY
                command(self.core.initiate, name, now)
            self.port_events.check_volume(name, p, now)
        self._flush(now)

    def close(self) -> None:
        """Close the sockets (the peers learn of our end through DPD)."""
        self.io.close()

    def sync(self, now: float) -> None:
        """Make the core's peers match the IKE-keyed ports of the datapath, and have the
        sockets open while there are any."""
        self.peer_sync.sync(now)
        self._update_sockets(now)

    def screen(self, desired: Desired) -> Desired:
        """`desired` without the certificate-keyed tunnels whose certificates cannot be
        used (`Certificates.screen`). Called by the daemon on each reconfiguration."""
        return self.certs.screen(desired)

    # -- I/O --------------------------------------------------------------------------------

    def _missing_families(self) -> set[int]:
        """The address families of the peers' underlays whose sockets are not open."""
        want = {family_of(p.cfg.local_addr) for p in self.peers.values()}
        return want - self.io.families()

    def _update_sockets(self, now: float) -> None:
        if not self.peers:
            if self.sockets:
                self.close()
            return
        missing = self._missing_families()
        if not missing or now < self._next_bind:
            return
        errors = {}
        for family in sorted(missing):
            try:
                for port in (IKE_PORT, NAT_T_PORT):
                    self.io.open_port(port, family=family)
            except OSError as e:
                self.io.close(family)
                errors[family] = f"cannot bind UDP port {port} for IKE: {e.strerror or e}"
        if not errors:
            self._bind_error = None
            return
        self._next_bind = now + RETRY
        msg = "; ".join(errors.values())
        if msg != self._bind_error:
            vlog.err(msg)
        self._bind_error = msg
        for p in self.peers.values():
            err = errors.get(family_of(p.cfg.local_addr))
            if err is not None:
                p.port.ike_error = err

    def _receive(self, now: float) -> None:
        for key in list(self.sockets):
            for data, src, dst in self.io.received(key, RECV_BATCH):
                self.core.receive_datagram(data, src=src, dst=dst, now=now)
                self._flush(now)

    def _flush(self, now: float) -> None:
        for err in self.io.send(self.core.datagrams_to_send()):
            self.dp.log_rl(f"IKE: {err}")
        for ev in self.core.events():
            self.port_events.apply(ev, now)
        while self.core.errors:
            e = self.core.errors.popleft()
            self.dp.log_rl(f"IKE: {e}")
        if self.peer_sync.changed:
            self.peer_sync.changed = False
            self.on_change()

    # -- ovs-appctl ---------------------------------------------------------------------------

    def show(self, name: str | None = None) -> list[dict[str, object]]:
        """The IKE peers and SAs for ike/show: no keys, no PSK."""
        return self.appctl.show(name)

    def register_appctl(self) -> None:
        """ike/show [--json] [IFACE] and ike/rekey IFACE [child|ike]."""
        self.appctl.register()


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
