"""espswitchd's main loop: the IDL, the unixctl server and the datapath in one process."""

from __future__ import annotations

import contextlib
import gc
import os
import select
import time

import ovs.db.idl
import ovs.vlog

from espswitch.datapath import Datapath, PortError, fast
from espswitch.datapath.loop import EventLoop
from espswitch.datapath.protection import IpsecLayer
from espswitch.vswitchd import appctl, dirs, ike
from espswitch.vswitchd.config import Desired, IfaceConfig, desired_state, plan
from espswitch.vswitchd.seqstore import FILENAME as SEQ_FILENAME
from espswitch.vswitchd.seqstore import SeqStore

vlog = ovs.vlog.Vlog("espswitchd")
vlog_dp = ovs.vlog.Vlog("datapath")

STATS_INTERVAL = 5.0
# Status and link state are checked this often and written at once when they change (an SA
# that expired, a tunnel that lost its route), not only with the 5 s statistics.
STATUS_CHECK = 1.0
HOUSEKEEPING = 0.1
CONTROL_MAX_SLEEP = 1.0

WRITTEN = {
    "Interface": ["ofport", "error", "status", "statistics", "link_state", "mac_in_use",
                  "mtu"],
    "Open_vSwitch": ["cur_cfg"],
}


class RateLimit:
    """At most `burst` messages per `interval` seconds; the rest are counted."""

    def __init__(self, log, interval: float = 5.0, burst: int = 5) -> None:
        self.log = log
        self.interval = interval
        self.burst = burst
        self.window = 0.0
        self.count = 0
        self.suppressed = 0

    def __call__(self, msg: str) -> None:
        now = time.monotonic()
        if now - self.window > self.interval:
            if self.suppressed:
                self.log(f"{self.suppressed} similar messages suppressed")
            self.window, self.count, self.suppressed = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            self.log(msg)
        else:
            self.suppressed += 1


class CollectingPoller:
    """Quacks like ovs.poller.Poller: collects what the IDL and unixctl want to wait for."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        self.timeout = -1

    def fd_wait(self, fd, events) -> None:
        if not isinstance(fd, int):
            fd = fd.fileno()
        self.fds[fd] = self.fds.get(fd, 0) | events

    def timer_wait(self, msec) -> None:
        if msec <= 0:
            self.timeout = 0
        elif self.timeout < 0 or msec < self.timeout:
            self.timeout = msec

    def timer_wait_until(self, msec) -> None:
        self.timer_wait(msec - ovs.timeval.msec())

    def immediate_wake(self) -> None:
        self.timeout = 0


class Switchd:
    """Reconciles the datapath with OVSDB and writes state back."""

    def __init__(
        self,
        remote: str,
        schema_path: str,
        unixctl,
        dp: Datapath | None = None,
        routes=None,
        devices=None,
        seq_path: str | None = None,
    ) -> None:
        helper = ovs.db.idl.SchemaHelper(location=schema_path)
        helper.register_columns("Open_vSwitch", ["bridges", "next_cfg", "cur_cfg",
                                                 "other_config"])
        helper.register_columns("Bridge", ["name", "ports"])
        helper.register_columns("Port", ["name", "interfaces", "tag", "trunks"])
        helper.register_columns(
            "Interface",
            ["name", "type", "options", "ofport_request", "mtu_request",
             *WRITTEN["Interface"]],
        )
        self.idl = ovs.db.idl.Idl(remote, helper)
        for table, cols in WRITTEN.items():
            for c in cols:
                self.idl.tables[table].columns[c].alert = False
        self.unixctl = unixctl
        self.dp = dp or Datapath(devices, log=vlog.info, log_rl=RateLimit(vlog_dp.warn))
        self.loop = EventLoop(self.dp, log_rl=RateLimit(vlog_dp.warn))
        self.routes = routes
        self.exiting = False
        self.seqno = -1
        self.force = False
        self.txn = None
        self.txn_cfg = None
        self.current: dict[str, IfaceConfig] = {}
        self.errors: dict[str, str] = {}
        self.applied: Desired | None = None
        self.applied_cfg: list[int] | None = None
        self.next_stats = 0.0
        self.next_status = 0.0
        self._written: dict[str, tuple[dict[str, str], str]] = {}
        self.next_housekeeping = 0.0
        self._cep = None
        self.bugs = 0
        self._routes_warn = RateLimit(vlog.warn)
        self._fast_path_text = "true"
        self._fast_path_said: tuple[bool, bool] | None = None
        self._fast_loop_text: str | None = None
        self._bug_rl = RateLimit(vlog.err, interval=60.0, burst=3)
        appctl.register(self)
        self.ike = ike.attach(self)  # IKEv2 for tunnels keyed with psk/certs
        # Manually keyed SAs resume their sequence numbers after a restart.
        self.seq_store = SeqStore(seq_path or os.path.join(dirs.dbdir(), SEQ_FILENAME),
                                  vlog.warn)
        IpsecLayer.of(self.dp.ctx).seq_marks = self.seq_store.marks

    # --- reconcile -----------------------------------------------------------------------
    def config_changed(self) -> Desired | None:
        """The desired state if it differs from what was applied last, else None.

        The Python IDL bumps `change_seqno` for every row update, even of columns that
        espswitchd writes itself (statistics ...), so the decision is made here instead.
        """
        desired = desired_state(self.idl.tables["Bridge"].rows.values())
        next_cfg = [r.next_cfg for r in self.idl.tables["Open_vSwitch"].rows.values()]
        if desired == self.applied and next_cfg == self.applied_cfg:
            return None
        self.applied_cfg = next_cfg
        return desired

    def other_config(self) -> dict[str, str]:
        """The Open_vSwitch row's other_config (empty before the first snapshot)."""
        for row in self.idl.tables["Open_vSwitch"].rows.values():
            with contextlib.suppress(AttributeError):
                return dict(row.other_config)
        return {}

    def apply_fast_path(self) -> None:
        """`other_config:fast-path` (true by default): whether SAs installed from now on use
        the compiled fast path. Logged once per change; a value that is not true or false
        is warned about and the default kept."""
        text = self.other_config().get("fast-path", "true").strip().lower()
        if text not in ("true", "false"):
            if text != self._fast_path_text:
                vlog.warn(f"other_config:fast-path must be true or false, got {text!r}: "
                          "true is used")
            want = True
        else:
            want = text == "true"
        self._fast_path_text = text
        usable = want and fast.AVAILABLE
        if (want, usable) != self._fast_path_said:
            self._fast_path_said = (want, usable)
            if usable:
                vlog.info("fast path: on (compiled ESP over OpenSSL EVP) for SAs installed "
                          "from now on")
            elif want:
                vlog.warn(f"fast path: off: {fast.REASON}")
            else:
                vlog.info("fast path: off (other_config:fast-path=false): the Python ESP "
                          "engine is used for SAs installed from now on")
        self.dp.fast_path = usable
        self.apply_fast_loop()

    def apply_fast_loop(self) -> None:
        """`other_config:fast-loop` (true by default): whether the compiled poll loop waits
        and runs the batches the fast path takes whole (false: every batch comes back to
        Python's loop, as before the loop existed; a diagnostic and benchmark knob)."""
        text = self.other_config().get("fast-loop", "true").strip().lower()
        on = text != "false"
        if text != self._fast_loop_text:
            if text not in ("true", "false"):
                vlog.warn(f"other_config:fast-loop must be true or false, got {text!r}: "
                          "true is used")
            elif self._fast_loop_text is not None or not on:
                vlog.info(f"fast loop: {'on' if on else 'off (other_config:fast-loop)'}")
        self._fast_loop_text = text
        self.loop.use_fast_loop = on and fast.AVAILABLE

    def reconcile(self, desired: Desired) -> None:
        dp = self.dp
        t0 = time.monotonic()
        self.applied = desired
        self.apply_fast_path()
        desired = self.ike.screen(desired)  # unusable certificates: Interface.error
        p = plan(desired, self.current, set(dp.bridges))
        for name in p.del_ports:
            vlog.info(f"deleting interface {name}")
            dp.del_port(name)
            self.current.pop(name, None)
        for name in p.del_bridges:
            vlog.info(f"deleting bridge {name}")
            dp.del_bridge(name)
        for name in p.add_bridges:
            vlog.info(f"adding bridge {name}")
            dp.add_bridge(name)
        for cfg in p.vlan_updates:
            port = dp.ports.get(cfg.name)
            if port is not None:
                port.set_vlan(cfg.tag, cfg.trunks)
                port.bridge.flush_port(port)
                self.current[cfg.name] = cfg
        for cfg in p.mtu_updates:
            port = dp.ports.get(cfg.name)
            if port is not None:
                self._set_mtu(port, cfg.mtu_request)
                self.current[cfg.name] = cfg
        self.errors = dict(desired.errors)
        if self.routes is not None:
            self.refresh_routes()
        # Without an ofport_request, an interface keeps the port number it had (across a
        # restart of the daemon, or a change that recreates it), as in OVS.
        had = {}
        for row in self.idl.tables["Interface"].rows.values():
            if row.ofport and row.ofport[0] > 0:
                had[row.name] = row.ofport[0]
        for cfg in p.add_ports:
            try:
                dp.add_port(
                    cfg.bridge,
                    cfg.name,
                    cfg.type,
                    dict(cfg.options),
                    cfg.tag,
                    cfg.trunks,
                    cfg.ofport_request or had.get(cfg.name),
                )
            except PortError as e:
                self.errors[cfg.name] = str(e)
                vlog.warn(f"{cfg.name}: {e}")
                continue
            except Exception as e:  # a bug must not take every other port down
                self.errors[cfg.name] = f"interface {cfg.name} could not be created: {e}"
                vlog.exception(f"{cfg.name}: unexpected error")
                continue
            vlog.info(f"added interface {cfg.name} on bridge {cfg.bridge}")
            self.current[cfg.name] = cfg
            if cfg.mtu_request is not None:
                self._set_mtu(dp.ports[cfg.name], cfg.mtu_request)
        dp.run(time.monotonic())
        self.seq_store.save(time.monotonic())
        self.ike.run()
        self.write_back(cfg_done=True)
        vlog.dbg(
            f"reconfigured in {1000 * (time.monotonic() - t0):.1f} ms "
            f"(database change {self.seqno})"
        )

    def refresh_routes(self, fresh: bool = True) -> None:
        """Apply the kernel's routes and addresses: read now (`fresh`, in this process), or
        the view the routes' watcher process wrote last, if it wrote a new one."""
        t0 = time.monotonic()
        try:
            view = self.routes.read() if fresh else self.routes.latest()
            dt = time.monotonic() - t0
            if dt > 0.05:
                vlog.info(f"reading kernel routes took {1000 * dt:.0f} ms")
        except Exception as e:
            self._routes_warn(f"cannot read kernel routes: {e}")
            return
        if view is None:
            return
        routes, addresses = view
        if self.dp.routes.set_system(routes, addresses):
            self.dp.run(time.monotonic())

    @staticmethod
    def _set_mtu(port, mtu: int | None) -> None:
        """Interface.mtu_request; a refusal is the port's to log and to show in status."""
        port.set_mtu_request(mtu)
        if mtu is not None and not port.mtu_error and port.mtu() == mtu:
            vlog.info(f"{port.name}: MTU {mtu} (mtu_request)")

    def write_back(self, cfg_done: bool) -> None:
        if self.txn is not None:
            self.force = self.force or cfg_done
            return
        txn = ovs.db.idl.Transaction(self.idl)
        dp = self.dp
        written = {}
        for row in self.idl.tables["Interface"].rows.values():
            port = dp.ports.get(row.name)
            if port is not None:
                status, link = port.status(), port.link_state()
                written[row.name] = (status, link)
                want = {
                    "ofport": [port.ofport],
                    "error": [],
                    "status": status,
                    "link_state": [link],
                    "statistics": port.statistics(),
                }
                mac = port.mac_in_use()
                want["mac_in_use"] = [mac] if mac else []
                mtu = port.mtu()
                want["mtu"] = [mtu] if mtu is not None else []
            elif row.name in self.errors:
                want = {
                    "ofport": [-1],
                    "error": [self.errors[row.name]],
                    "status": {},
                    "link_state": [],
                    "statistics": {},
                    "mac_in_use": [],
                    "mtu": [],
                }
            else:
                continue
            for col, val in want.items():
                if getattr(row, col) != val:
                    setattr(row, col, val)
        self._written = written
        cfg = None
        if cfg_done:
            for ovsrow in self.idl.tables["Open_vSwitch"].rows.values():
                if ovsrow.cur_cfg != ovsrow.next_cfg:
                    ovsrow.cur_cfg = ovsrow.next_cfg
                cfg = ovsrow.next_cfg
        status = txn.commit()
        if status == ovs.db.idl.Transaction.INCOMPLETE:
            self.txn = txn
            self.txn_cfg = cfg
        else:
            self._txn_done(status, txn)

    def _txn_done(self, status, txn) -> None:
        if status == ovs.db.idl.Transaction.TRY_AGAIN:
            self.force = True
        elif status not in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.UNCHANGED):
            vlog.warn(f"database transaction failed: {status} {txn.get_error()}")
            self.force = True

    # --- control plane -------------------------------------------------------------------
    def control_run(self) -> None:
        if self.routes is not None and self.routes.changed():
            self.refresh_routes(fresh=False)
        self.unixctl.run()
        self.ike.run()
        self.idl.run()
        if self.txn is not None:
            status = self.txn.commit()
            if status == ovs.db.idl.Transaction.INCOMPLETE:
                return
            txn, self.txn = self.txn, None
            self._txn_done(status, txn)
        if not self.idl.has_ever_connected():
            return
        if self.idl.change_seqno != self.seqno or self.force:
            self.seqno = self.idl.change_seqno
            force, self.force = self.force, False
            desired = self.config_changed()
            if desired is None and force:
                desired = self.applied
            if desired is not None:
                self.reconcile(desired)
        now = time.monotonic()
        if now >= self.next_stats:
            self.next_stats = now + STATS_INTERVAL
            self.write_back(cfg_done=False)
        elif now >= self.next_status:
            self.next_status = now + STATUS_CHECK
            if self.status_changed():
                self.write_back(cfg_done=False)

    def status_changed(self) -> bool:
        """Whether any port's status or link state differs from what was last written."""
        ports = self.dp.ports
        for name, seen in self._written.items():
            port = ports.get(name)
            if port is not None and seen != (port.status(), port.link_state()):
                return True
        return False

    def control_wait(self) -> float:
        """Register the control plane's fds in a fresh epoll; return its timeout (s)."""
        p = CollectingPoller()
        self.unixctl.wait(p)
        self.idl.wait(p)
        if self.txn is not None:
            self.txn.wait(p)
        self.ike.wait(p)
        if self.routes is not None:
            p.fd_wait(self.routes.fileno(), select.POLLIN)
        if self._cep is not None:
            self.loop.set_control_fd(None)
            self._cep.close()
        cep = select.epoll()
        for fd, ev in p.fds.items():
            with contextlib.suppress(OSError):
                cep.register(fd, ev)
        self._cep = cep
        self.loop.set_control_fd(cep.fileno())
        return p.timeout / 1000.0 if p.timeout >= 0 else CONTROL_MAX_SLEEP

    def run_forever(self) -> None:
        # The datapath allocates a few objects per packet and makes no cycles: the
        # collector's default (a young-generation pass every 700 allocations, and full
        # passes over the whole database replica) cost about a tenth of the forwarding
        # time. Young passes are rarer, and what exists at start is left out of them.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        control_deadline = 0.0
        control_ready = True
        while not self.exiting:
            now = time.monotonic()
            if control_ready or now >= control_deadline:
                try:
                    self.control_run()
                except Exception:  # a bug must not stop every bridge
                    self.bugs += 1
                    self.log_bug("control plane error")
                if self.exiting:
                    break
                control_deadline = now + min(self.control_wait(), CONTROL_MAX_SLEEP)
            if now >= self.next_housekeeping:
                self.next_housekeeping = now + HOUSEKEEPING
                try:
                    self.dp.run(now)
                    self.seq_store.save(now)
                except Exception:
                    self.bugs += 1
                    self.log_bug("housekeeping error")
            timeout = max(0.0, min(control_deadline, self.next_housekeeping) - now)
            control_ready = self.loop.poll(timeout)

    def log_bug(self, what: str) -> None:
        """Log an unexpected exception with its traceback, rate-limited."""
        if self._bug_rl.count < self._bug_rl.burst:
            vlog.exception(what)
        self._bug_rl(f"{what} (see the traceback above)")

    def close(self) -> None:
        self.ike.close()
        self.dp.close()
        self.loop.close()
        self.idl.close()
        if self.routes is not None:
            self.routes.close()
