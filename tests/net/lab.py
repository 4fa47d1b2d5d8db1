"""Build hypervisor/VM topologies in network namespaces, as an operator would.

Everything is created with `espswitch start`, `ovs-vsctl` and `ip`, under names unique to
this test process, and `Lab.close()` removes all of it: daemons, namespaces, devices.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

VM_MTU = 1450


class CmdError(AssertionError):
    pass


def run(cmd: list[str], ns: str | None = None, env: dict | None = None, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + cmd
    e = dict(os.environ)
    if env:
        e.update(env)
    r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=e)
    if check and r.returncode != 0:
        raise CmdError(f"{' '.join(full)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@dataclass
class Hypervisor:
    lab: Lab
    ns: str
    dir: str
    underlay_ip: str = ""
    started: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {"OVS_RUNDIR": self.dir, "OVS_DBDIR": self.dir, "OVS_LOGDIR": self.dir}

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60):
        return run(list(cmd), self.ns, self.env, check, timeout)

    def vsctl(self, *args: str, check: bool = True):
        return self.sh("ovs-vsctl", "--timeout=20", *args, check=check, timeout=30)

    def appctl(self, *args: str, check: bool = True) -> str:
        return self.sh("ovs-appctl", "-t", "espswitchd", *args, check=check).stdout

    def start(self) -> None:
        self.sh("espswitch", "start", timeout=60)
        self.started = True

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

    def iface(self, name: str, col: str) -> str:
        return self.vsctl("get", "Interface", name, col).stdout.strip()

    def add_vm(self, bridge: str, vm: Vm, tag: int | None = None) -> None:
        """A `tap` port on `bridge` whose device is moved into the VM's namespace."""
        extra = [f"tag={tag}"] if tag is not None else []
        self.vsctl("add-port", bridge, vm.tap, *extra, "--", "set", "Interface", vm.tap,
                   "type=tap")
        self.plug(vm)

    def plug(self, vm: Vm) -> None:
        self.sh("ip", "link", "set", vm.tap, "netns", vm.ns)
        vm.sh("ip", "link", "set", vm.tap, "address", vm.mac, "mtu", str(VM_MTU), "up")
        vm.sh("ip", "addr", "replace", f"{vm.ip}/24", "dev", vm.tap)


@dataclass
class Vm:
    lab: Lab
    ns: str
    tap: str
    ip: str
    mac: str

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60):
        return run(list(cmd), self.ns, None, check, timeout)

    def ping(self, ip: str, count: int = 3, interval: float = 0.01, wait: float = 1,
             check: bool = False):
        return self.sh("ping", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait),
                       ip, check=check, timeout=count * interval + wait + 30)

    def can_reach(self, ip: str) -> bool:
        return self.ping(ip, count=1, wait=1).returncode == 0


@dataclass
class Lab:
    tmp: str
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000}{secrets.token_hex(2)}")
    namespaces: list[str] = field(default_factory=list)
    hvs: list[Hypervisor] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def netns(self, role: str) -> str:
        name = f"es-{role}-{self.tag}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "link", "set", "lo", "up"], name)
        # IPv6 chatter (router solicitations ...) would blur what the underlay carries.
        for k in ("all", "default"):
            run(["sysctl", "-qw", f"net.ipv6.conf.{k}.disable_ipv6=1"], name)
        return name

    def hypervisor(self, role: str) -> Hypervisor:
        ns = self.netns(role)
        d = os.path.join(self.tmp, role)
        os.makedirs(d, exist_ok=True)
        hv = Hypervisor(self, ns, d)
        self.hvs.append(hv)
        return hv

    def vm(self, role: str, n: int, ip: str) -> Vm:
        ns = self.netns(role)
        return Vm(self, ns, f"tap{role}"[:15], ip, f"52:54:00:12:34:{n:02x}")

    def underlay(self, a: Hypervisor, b: Hypervisor, ip_a: str, ip_b: str) -> None:
        """A veth pair `ul0` between the two, on br-phy as a system port, IP on br-phy."""
        run(["ip", "link", "add", "ul0", "netns", a.ns, "type", "veth", "peer", "name", "ul0",
             "netns", b.ns])
        for hv, ip in ((a, ip_a), (b, ip_b)):
            hv.underlay_ip = ip
            hv.vsctl("add-br", "br-phy", "--", "add-port", "br-phy", "ul0")
            hv.sh("ip", "addr", "add", f"{ip}/24", "dev", "br-phy")
            hv.sh("ip", "link", "set", "br-phy", "up")

    def spawn(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                p.communicate(timeout=5)
        for hv in self.hvs:
            hv.stop()
            for name in ("espswitchd", "ovsdb-server"):
                pid = hv.pid(name)
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for ns in self.namespaces:
            # Kill whatever still runs in the namespace (iperf3 servers ...), then delete it.
            r = run(["ip", "netns", "pids", ns], check=False)
            for pid in r.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_until(pred, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until `pred()` held, or None after `timeout`."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(interval)


def build_tunnel_lab(tmp: str, vni: int = 5000) -> tuple[Lab, dict]:
    """Two hypervisors (underlay 10.0.0.1/2) with one VM each on br-int, and a vxlan port."""
    lab = Lab(tmp)
    try:
        a, b = lab.hypervisor("hva"), lab.hypervisor("hvb")
        a.start()
        b.start()
        lab.underlay(a, b, "10.0.0.1", "10.0.0.2")
        vma, vmb = lab.vm("vma", 1, "192.168.10.1"), lab.vm("vmb", 2, "192.168.10.2")
        for hv, vm, remote in ((a, vma, "10.0.0.2"), (b, vmb, "10.0.0.1")):
            hv.vsctl("add-br", "br-int")
            hv.add_vm("br-int", vm)
            hv.vsctl("add-port", "br-int", "vx0", "--", "set", "Interface", "vx0", "type=vxlan",
                     f"options:remote_ip={remote}", f"options:key={vni}")
    except BaseException:
        lab.close()
        raise
    return lab, {"a": a, "b": b, "vma": vma, "vmb": vmb, "vni": vni}
