"""A two-hypervisor lab on one machine: network namespaces, a veth underlay, two VMs.

Used by `espswitch demo`, the end-to-end tests and the benchmarks, so that all three build
the same topology the way an operator would: `espswitch start`, `ovs-vsctl` and `ip`. It is
a `Topology` of espswitch.cli.labkit (the building blocks the other test topologies use too).

    vm1 ns            hv1 ns                                  hv2 ns            vm2 ns
    [tap vm1] -- br-int --[tunnel]          [tunnel]-- br-int -- [tap vm2]
                  br-phy(192.0.2.1) -- veth ===== veth -- br-phy(192.0.2.2)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from espswitch.cli.labkit import Hypervisor, LabError, Topology, Vm, run

UNDERLAY = ("192.0.2.1", "192.0.2.2")
UNDERLAY6 = ("2001:db8:e5::1", "2001:db8:e5::2")  # Lab(underlay_ips=UNDERLAY6): IPv6 underlay
VM_IPS = ("198.51.100.1", "198.51.100.2")
DEFAULT_VNI = 5001


# strongSwan as a peer (tests and benchmarks): charon with its userspace ESP (kernel-libipsec),
# as ../shared/spec/references.md runs it here; `kdf` is needed, pkcs8/mgf1 for certificates.
CHARON_PLUGINS = ("random nonce openssl aes sha1 sha2 hmac gcm chapoly pem pkcs1 pkcs8 x509 "
                  "curve25519 gmp mgf1 kdf kernel-libipsec kernel-netlink socket-default vici "
                  "updown")


def strongswan_conf(d: str) -> str:
    """A strongswan.conf for one charon whose vici socket and log live in directory `d`."""
    return f"""charon {{
  load = {CHARON_PLUGINS}
  install_routes = yes
  retransmit_timeout = 1.0
  retransmit_tries = 3
  plugins {{
    vici {{
      socket = unix://{d}/charon.vici
    }}
    kernel-libipsec {{
      load = yes
      allow_peer_ts = yes
    }}
  }}
  filelog {{
    f {{
      path = {d}/charon.log
      default = 1
      ike = 2
      chd = 2
      flush_line = yes
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
}}
"""


CHARON = "/usr/lib/ipsec/charon"


def start_charon(ns: str, d: str) -> subprocess.Popen[bytes]:
    """Start charon in namespace `ns` with strongswan.conf, its log and vici socket in `d`
    and a private /run (charon's pid file is fixed at /var/run/charon.pid); return once
    the vici socket is open. Raises LabError with the end of its log if it does not come up.
    """
    os.makedirs(os.path.join(d, "run"), exist_ok=True)
    conf = os.path.join(d, "strongswan.conf")
    with open(conf, "w") as f:
        f.write(strongswan_conf(d))
    vici = os.path.join(d, "charon.vici")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(vici)  # a stale socket would look like a started charon
    with open(os.path.join(d, "stdout"), "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sh", "-c", f"mount --bind {d}/run /run && exec {CHARON}"],
            env=dict(os.environ, STRONGSWAN_CONF=conf), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 15
    while not os.path.exists(vici):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_charon(proc)
            tails = []
            for name in ("stdout", "charon.log"):
                with contextlib.suppress(OSError), open(os.path.join(d, name)) as f:
                    tails.append(f.read()[-1500:])
            raise LabError(f"charon in {ns} did not start: {' '.join(tails).strip()}")
        time.sleep(0.05)
    time.sleep(0.1)
    return proc


def stop_charon(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a charon started by `start_charon` (its whole process group)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def tcpdump(ns: str, dev: str, path: str, bpf: Sequence[str] = ()) -> Iterator[str]:
    """tcpdump -w `path` on `dev` in namespace `ns` while the block runs."""
    # --immediate-mode: without it, a capture shorter than tcpdump's 1 s buffer timeout
    # can end with its packets still in the kernel's ring, never written.
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "-n", "-U",
                             "--immediate-mode", "-s", "0", "-w", path, *bpf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The pcap file header is written once the capture socket is open.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(path) and os.path.getsize(path) >= 24:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        yield path
    finally:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class LabHypervisor(Hypervisor):
    """A hypervisor of the two-hypervisor `Lab`: its index (0, 1), its VM and tunnel port."""

    index: int = 0
    vm_ns: str = ""
    tap: str = ""
    vm_ip: str = ""
    tunnel: str = "tun0"


@dataclass
class Lab(Topology):
    """The topology; use as a context manager so it is always taken down.

    `tunnel_options` are the `options:` of the tunnel interface on each side (index 0, 1);
    `remote_ip` and `key` are filled in. `other_config` is set on each hypervisor's
    Open_vSwitch row (`ovs-vsctl set Open_vSwitch . other_config:K=V`) right after its
    switch starts, before any bridge or tunnel exists (e.g. `fast-path=false`, which applies
    to SAs installed from then on). Namespaces are named `TAG-hv1`, `TAG-vm1`, ... with
    TAG `es` and six random hex digits; they keep IPv6, as they always have (the VMs' IPv6
    chatter crosses the tunnel as ESP too).
    """

    tag: str = field(default_factory=lambda: "es" + secrets.token_hex(3))
    ipv6: bool = True
    tunnel_type: str = "vxlanipsec"
    tunnel_options: tuple[dict[str, str], dict[str, str]] = field(
        default_factory=lambda: ({}, {}))
    vni: int = DEFAULT_VNI
    #: the tunnel endpoints (br-phy's addresses): IPv4 or IPv6 (UNDERLAY6)
    underlay_ips: tuple[str, str] = UNDERLAY
    other_config: dict[str, str] = field(default_factory=dict)
    hvs: list[LabHypervisor] = field(default_factory=list)

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def ns_name(self, role: str) -> str:
        return f"{self.tag}-{role}"

    # -- building -------------------------------------------------------------------------

    def build(self) -> None:
        """Create namespaces, both switches, the underlay, bridges, VMs and the tunnel."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces and TAP devices)")
        for tool in ("ip", "ovs-vsctl", "ovsdb-server", "ovs-appctl"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: run scripts/install.sh first")
        for i in (1, 2):
            hv = self.hypervisor(f"hv{i}", LabHypervisor, index=i - 1, tap=f"vm{i}",
                                 vm_ip=VM_IPS[i - 1])
            hv.vm_ns = self.netns(f"vm{i}")
        a, b = self.hvs
        for hv in self.hvs:
            hv.start()
            if self.other_config:
                hv.vsctl("set", "Open_vSwitch", ".",
                         *(f"other_config:{k}={v}" for k, v in self.other_config.items()))
        self.underlay(a, b, *self.underlay_ips, devs=(f"{self.tag}u1", f"{self.tag}u2"),
                      datapath_type="netdev")
        for hv, peer in ((a, b), (b, a)):
            hv.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int",
                     "datapath_type=netdev",
                     "--", "add-port", "br-int", hv.tap, "--", "set", "interface", hv.tap,
                     "type=tap",
                     "--", "add-port", "br-int", hv.tunnel, "--", "set", "interface",
                     hv.tunnel, *self.tunnel_args(hv, peer))
            hv.sh("ip", "link", "set", "br-int", "up")
            hv.plug(Vm(hv.vm_ns, hv.tap, hv.vm_ip))

    def vsctl(self, hv: Hypervisor, *args: str, check: bool = True,
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """hv.vsctl(...): ovs-vsctl in this hypervisor (waits for espswitchd to apply it)."""
        return hv.vsctl(*args, check=check, timeout=timeout)

    def appctl(self, hv: Hypervisor, *args: str, check: bool = True,
               ) -> subprocess.CompletedProcess[str]:
        """hv.appctl(...): ovs-appctl -t espswitchd in this hypervisor."""
        return hv.appctl(*args, check=check)

    def tunnel_args(self, hv: LabHypervisor, peer: LabHypervisor) -> list[str]:
        """`set interface` arguments that (re)configure this side's tunnel."""
        opts = {"remote_ip": peer.underlay_ip, "key": str(self.vni)}
        opts.update(self.tunnel_options[hv.index])
        return [f"type={self.tunnel_type}", *(f"options:{k}={v}" for k, v in opts.items())]

    # -- using ----------------------------------------------------------------------------

    def ping(self, count: int = 5, interval: float = 0.2, size: int | None = None,
             src: int = 0, extra: Sequence[str] = (), timeout: float = 60,
             ) -> subprocess.CompletedProcess[str]:
        """ping from VM `src` to the other VM; returns the finished process (not checked)."""
        hv, peer = self.hvs[src], self.hvs[1 - src]
        cmd = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2"]
        if size is not None:
            cmd += ["-s", str(size)]
        return run([*cmd, *extra, peer.vm_ip], hv.vm_ns, check=False, timeout=timeout)

    def wait_for_ping(self, timeout: float = 20.0) -> bool:
        """Ping until one reply comes back (ARP and neighbour learning take a moment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping(count=1, interval=0.2).returncode == 0:
                return True
        return False

    def capture(self, hv_index: int = 0, pcap: str | None = None,
                bpf: str = "") -> contextlib.AbstractContextManager[str]:
        """tcpdump on hypervisor `hv_index`'s underlay device while the block runs."""
        hv = self.hvs[hv_index]
        path = pcap or os.path.join(self.tmp or "/tmp", f"underlay{hv_index + 1}.pcap")
        return tcpdump(hv.ns, hv.underlay_dev, path, bpf.split() if bpf else ())
