"""A strongSwan 5.9 peer in a network namespace, for the IKE tests (see references.md).

`Lab` makes two namespaces joined by a veth (192.0.2.1 for espswitch, 192.0.2.2 for
charon, and 10.200.2.1 on lo behind charon), starts charon with
kernel-libipsec in its own /run, and removes everything in `close()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from espswitch.cli.lab import CHARON, start_charon, stop_charon

ES_ADDR, SW_ADDR = "192.0.2.1", "192.0.2.2"
ES_NET, SW_NET = "10.200.1.0/24", "10.200.2.0/24"
ES_INNER, SW_INNER = "10.200.1.1", "10.200.2.1"
PSK = "espswitch-test-psk-0123456789"

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def strongswan_missing() -> str | None:
    """Why strongSwan tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not os.path.exists(CHARON) or shutil.which("swanctl") is None:
        return "strongSwan (charon, swanctl) is not installed"
    return None


def sh(*cmd: str, ns: str | None = None, check: bool = True, timeout: float = 20,
       env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command (in namespace `ns`) and return the completed process."""
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(full)} failed: {r.stdout} {r.stderr}")
    return r


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the body in network namespace `ns` (this thread only); sockets made there stay."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), "setns failed")
        try:
            yield
        finally:
            if _libc.setns(own, _CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back failed")
    finally:
        os.close(own)
        os.close(target)


def udp_sockets(ns: str, addr: str) -> dict[int, socket.socket]:
    """UDP sockets on ports 500 and 4500 of `addr`, made inside namespace `ns`."""
    out = {}
    with in_netns(ns):
        for port in (500, 4500):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            s.setblocking(False)
            out[port] = s
    return out




class Lab:
    """Two namespaces and a charon; `close()` removes all of it."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.es_ns, self.sw_ns = f"ike-es-{tag}", f"ike-sw-{tag}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"ike-{tag}-"))
        self.charon: subprocess.Popen | None = None
        self._made: list[str] = []
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        for ns in (self.es_ns, self.sw_ns):
            sh("ip", "netns", "add", ns)
            self._made.append(ns)
        veth_a, veth_b = f"ve{self.es_ns[-8:]}", f"vs{self.es_ns[-8:]}"
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_a, "netns", self.es_ns)
        sh("ip", "link", "set", veth_b, "netns", self.sw_ns)
        for ns, dev, addr in ((self.es_ns, veth_a, ES_ADDR), (self.sw_ns, veth_b, SW_ADDR)):
            sh("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        # No dummy driver in this kernel: the address behind charon lives on lo.
        sh("ip", "addr", "add", f"{SW_INNER}/32", "dev", "lo", ns=self.sw_ns)
        (self.dir / "run").mkdir()
        for sub in ("x509", "x509ca", "private"):
            (self.dir / sub).mkdir()

    @property
    def uri(self) -> str:
        return f"unix://{self.dir}/charon.vici"

    def start_charon(self, swanctl_conf: str) -> None:
        """(Re)start charon with this swanctl.conf and load it."""
        self.stop_charon()
        (self.dir / "swanctl.conf").write_text(swanctl_conf)
        self.charon = start_charon(self.sw_ns, str(self.dir))
        self.swanctl("--load-all")

    def swanctl(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run swanctl against this charon; returns its stdout."""
        env = dict(os.environ, SWANCTL_DIR=str(self.dir),
                   STRONGSWAN_CONF=str(self.dir / "strongswan.conf"))
        r = sh("swanctl", *args, "--uri", self.uri, ns=self.sw_ns, check=check,
               timeout=timeout, env=env)
        return r.stdout + r.stderr

    def swanctl_cmd(self, *args: str) -> list[str]:
        """The argv of a swanctl command, for asyncio subprocesses."""
        return ["env", f"SWANCTL_DIR={self.dir}", f"STRONGSWAN_CONF={self.dir}/strongswan.conf",
                "ip", "netns", "exec", self.sw_ns, "swanctl", *args, "--uri", self.uri]

    def list_sas(self) -> str:
        """`swanctl --list-sas` output."""
        return self.swanctl("--list-sas", check=False)

    def log(self) -> str:
        """charon's log so far."""
        p = self.dir / "charon.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def kill_charon(self) -> None:
        """SIGKILL charon (a dead peer)."""
        if self.charon is not None and self.charon.poll() is None:
            os.killpg(self.charon.pid, signal.SIGKILL)
            self.charon.wait(5)

    def stop_charon(self) -> None:
        """Stop charon if it runs."""
        stop_charon(self.charon)
        self.charon = None

    def close(self) -> None:
        """Stop charon, delete the namespaces and the temporary directory."""
        try:
            self.stop_charon()
        finally:
            for ns in self._made:
                sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(self.dir, ignore_errors=True)


def swanctl_conf(*, ike: str = "aes128gcm16-prfsha256-x25519", esp: str = "aes128gcm16",
                 auth: str = "psk", local_id: str = "charon.test",
                 remote_id: str = "espswitch.test", local_cert: str | None = None,
                 encap: bool = True, dpd: int = 0, extra_child: str = "",
                 rekey_time: str = "0", local_ts: str = SW_NET, remote_ts: str = ES_NET) -> str:
    """A swanctl.conf for charon facing espswitch (connection `es`, child `net`)."""
    local_auth = f"auth = {auth}\n      id = {local_id}"
    if local_cert:
        local_auth += f"\n      certs = {local_cert}"
    remote_auth = f"auth = {auth}\n      id = {remote_id}"
    secrets = "" if auth != "psk" else f"""
secrets {{
  ike-es {{
    id-a = {local_id}
    id-b = {remote_id}
    secret = "{PSK}"
  }}
}}"""
    return f"""connections {{
  es {{
    version = 2
    local_addrs = {SW_ADDR}
    remote_addrs = {ES_ADDR}
    proposals = {ike}
    encap = {"yes" if encap else "no"}
    dpd_delay = {dpd}
    rekey_time = 0
    local {{
      {local_auth}
    }}
    remote {{
      {remote_auth}
    }}
    children {{
      net {{
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = {esp}
        mode = tunnel
        rekey_time = {rekey_time}
      }}{extra_child}
    }}
  }}
}}{secrets}
"""
