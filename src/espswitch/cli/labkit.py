"""Building blocks of network-namespace labs, as an operator would build them by hand.

`run` runs a command (in a namespace); `add_netns`/`delete_netns` make and remove a
namespace; a `Topology` owns the namespaces, hypervisors (`Hypervisor`: its own OVS
directories, `espswitch start`, `ovs-vsctl`, `ovs-appctl`), VMs (`Vm`: a namespace holding
a TAP device) and background processes of one run, under names unique to that run, and
`close()` removes all of it. The two-hypervisor lab of `espswitch demo` and the benchmarks
(`espswitch.cli.lab.Lab`) and the end-to-end tests' topologies are built from them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

VM_MTU = 1450
#: the environment variable that puts every lab hypervisor on the Python datapath (false)
FAST_PATH_ENV = "ESPSWITCH_LAB_FAST_PATH"


class LabError(Exception):
    """A lab step failed; the message names the step and what the tool said."""


def run(cmd: Sequence[str], ns: str | None = None, *, env: Mapping[str, str] | None = None,
        check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command, in namespace `ns` if given, with `env` added to this process's
    environment; raise LabError with the last line it printed on failure or timeout."""
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    try:
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)}: no answer after {timeout:.0f} s") from None
    if check and r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise LabError(f"{' '.join(cmd)} failed: {detail[-1] if detail else r.returncode}")
    return r


def add_netns(name: str, *, ipv6: bool = False) -> None:
    """Create namespace `name` with its loopback up and, unless `ipv6`, IPv6 off (its
    chatter, router solicitations and the like, would blur what the underlay carries).
    If a step after `ip netns add` fails, the namespace is deleted again."""
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "link", "set", "lo", "up"], name)
        if not ipv6:
            for k in ("all", "default"):
                run(["sysctl", "-qw", f"net.ipv6.conf.{k}.disable_ipv6=1"], name)
    except BaseException:
        delete_netns(name)
        raise


def delete_netns(name: str) -> None:
    """Kill whatever still runs in namespace `name` (ping, iperf3, tcpdump ...), then
    delete it; never raises for a namespace that is already gone."""
    for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "del", name], check=False)


@dataclass
class Vm:
    """A VM: namespace `ns` holding TAP device `tap` (once plugged) with address `ip`/24;
    `mac` and `mtu` are set on the device when given, else the kernel's are kept."""

    ns: str
    tap: str
    ip: str
    mac: str | None = None
    mtu: int | None = None

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60,
           ) -> subprocess.CompletedProcess[str]:
        return run(cmd, self.ns, check=check, timeout=timeout)

    def ping(self, ip: str, count: int = 3, interval: float = 0.01, wait: float = 1,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.sh("ping", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait),
                       ip, check=check, timeout=count * interval + wait + 30)

    def can_reach(self, ip: str) -> bool:
        return self.ping(ip, count=1, wait=1).returncode == 0


@dataclass
class Hypervisor:
    """A hypervisor: namespace `ns` whose switch keeps its database, sockets, pid files and
    logs in `dir` (OVS_RUNDIR, OVS_DBDIR, OVS_LOGDIR)."""

    lab: Topology
    ns: str
    dir: str
    underlay_ip: str = ""
    underlay_dev: str = ""

    @property
    def env(self) -> dict[str, str]:
        """What OVS tools and espswitch in this hypervisor need added to the environment."""
        return {"OVS_RUNDIR": self.dir, "OVS_DBDIR": self.dir, "OVS_LOGDIR": self.dir}

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60,
           ) -> subprocess.CompletedProcess[str]:
        return run(cmd, self.ns, env=self.env, check=check, timeout=timeout)

    def vsctl(self, *args: str, check: bool = True, timeout: float = 30,
              ) -> subprocess.CompletedProcess[str]:
        """ovs-vsctl here (without --no-wait it returns once espswitchd applied the change)."""
        return self.sh("ovs-vsctl", f"--timeout={int(timeout)}", *args, check=check,
                       timeout=timeout + 5)

    def appctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """ovs-appctl -t espswitchd here."""
        return self.sh("ovs-appctl", "-t", "espswitchd", *args, check=check)

    def iface(self, name: str, col: str) -> str:
        return self.vsctl("get", "Interface", name, col).stdout.strip()

    def start(self) -> None:
        """`espswitch start`: ovsdb-server (database created if missing) and espswitchd.

        With ESPSWITCH_LAB_FAST_PATH=false (or true) in the environment, every lab
        hypervisor gets `other_config:fast-path` set so before any port exists: how the
        end-to-end tests run on the pure-Python datapath."""
        self.sh("espswitch", "start", timeout=60)
        mode = os.environ.get(FAST_PATH_ENV, "")
        if mode in ("true", "false"):
            self.vsctl("set", "Open_vSwitch", ".", f"other_config:fast-path={mode}")

    def stop(self) -> None:
        self.sh("espswitch", "stop", check=False, timeout=60)

    def pid(self, name: str = "espswitchd") -> int | None:
        try:
            with open(os.path.join(self.dir, f"{name}.pid")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                return not f.read().split(") ", 1)[1].startswith("Z")
        except OSError:
            return False

    def add_vm(self, bridge: str, vm: Vm, tag: int | None = None) -> None:
        """A `tap` port on `bridge` whose device is moved into the VM's namespace."""
        extra = [f"tag={tag}"] if tag is not None else []
        self.vsctl("add-port", bridge, vm.tap, *extra, "--", "set", "Interface", vm.tap,
                   "type=tap")
        self.plug(vm)

    def plug(self, vm: Vm) -> None:
        """Move the VM's TAP device (made by the switch) into its namespace and configure it."""
        self.sh("ip", "link", "set", vm.tap, "netns", vm.ns)
        link = ["address", vm.mac] if vm.mac else []
        if vm.mtu is not None:
            link += ["mtu", str(vm.mtu)]
        vm.sh("ip", "link", "set", vm.tap, *link, "up")
        vm.sh("ip", "addr", "replace", f"{vm.ip}/24", "dev", vm.tap)


@dataclass
class Topology:
    """Namespaces, hypervisors, VMs and processes of one run, named after `tag` (unique to
    the run); `close()` (or leaving a `with` block) removes all of it and directory `tmp`."""

    tmp: str = ""  # made, named after `tag`, by the first hypervisor() if not given
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000}{secrets.token_hex(2)}")
    ipv6: bool = False  # whether the namespaces keep IPv6 (see add_netns)
    namespaces: list[str] = field(default_factory=list)
    hvs: list[Hypervisor] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ns_name(self, role: str) -> str:
        return f"es-{role}-{self.tag}"

    def netns(self, role: str) -> str:
        """A new namespace for `role`; its name."""
        name = self.ns_name(role)
        add_netns(name, ipv6=self.ipv6)
        self.namespaces.append(name)
        return name

    def hypervisor(self, role: str, kind: type[Hypervisor] = Hypervisor,
                   **fields: Any) -> Any:
        """A hypervisor (not started) in a new namespace, its directories in tmp/`role`;
        `kind` may be a subclass of Hypervisor, given its own `fields`."""
        ns = self.netns(role)
        if not self.tmp:
            self.tmp = tempfile.mkdtemp(prefix=f"{self.tag}-")
        d = os.path.join(self.tmp, role)
        os.makedirs(d, exist_ok=True)
        hv = kind(self, ns, d, **fields)
        self.hvs.append(hv)
        return hv

    def vm(self, role: str, n: int, ip: str) -> Vm:
        """A VM namespace whose TAP device gets MAC 52:54:00:12:34:`n` and MTU VM_MTU."""
        return Vm(self.netns(role), f"tap{role}"[:15], ip, f"52:54:00:12:34:{n:02x}", VM_MTU)

    def underlay(self, a: Hypervisor, b: Hypervisor, ip_a: str, ip_b: str,
                 devs: tuple[str, str] = ("ul0", "ul0"), datapath_type: str = "") -> None:
        """A veth pair (`devs`) between the two, each end the system port of br-phy, which
        gets the hypervisor's underlay address (IPv4 in a /24, or IPv6 in a /64 without
        duplicate address detection, usable at once)."""
        run(["ip", "link", "add", devs[0], "netns", a.ns, "type", "veth", "peer", "name",
             devs[1], "netns", b.ns])
        dp = ["--", "set", "bridge", "br-phy", f"datapath_type={datapath_type}"] \
            if datapath_type else []
        for hv, dev, ip in ((a, devs[0], ip_a), (b, devs[1], ip_b)):
            hv.underlay_ip, hv.underlay_dev = ip, dev
            hv.sh("ip", "link", "set", dev, "up")
            hv.vsctl("add-br", "br-phy", *dp, "--", "add-port", "br-phy", dev)
            if ":" in ip:
                hv.sh("ip", "addr", "add", f"{ip}/64", "dev", "br-phy", "nodad")
            else:
                hv.sh("ip", "addr", "add", f"{ip}/24", "dev", "br-phy")
            hv.sh("ip", "link", "set", "br-phy", "up")

    def spawn(self, ns: str, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
        """A background command in `ns` (stdout and stderr piped), killed by close()."""
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        """Kill spawned processes, stop every switch (SIGKILL what a stop left running),
        delete every namespace with what still runs in it, and remove `tmp`."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                p.communicate(timeout=5)
        self.procs.clear()
        for hv in self.hvs:
            if not os.path.isdir(hv.dir):
                continue
            with contextlib.suppress(LabError):
                hv.stop()
            for name in ("espswitchd", "ovsdb-server"):
                pid = hv.pid(name)
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for ns in reversed(self.namespaces):
            delete_netns(ns)
        self.namespaces.clear()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""
