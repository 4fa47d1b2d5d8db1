"""Two IKE cores over an in-memory link (bytes only), with a controllable clock."""

from __future__ import annotations

from espswitch.ike import ChildConfig, Credentials, IkeCore, PeerConfig
from espswitch.ike.events import ChildSaInstalled, Event

A_ADDR, B_ADDR = "192.0.2.1", "192.0.2.2"
PSK = b"in-memory test key"
VXLAN_CHILD_A = ChildConfig(name="vx", local_ts="dynamic[udp]", remote_ts="dynamic[udp]",
                            mode="transport")


def peer(local: str, remote: str, name: str, **kw: object) -> PeerConfig:
    """A PSK peer config between two of the test addresses."""
    kw.setdefault("credentials", Credentials(psk=PSK))
    kw.setdefault("local_id", f"{local}")
    kw.setdefault("remote_id", f"{remote}")
    return PeerConfig(name=name, local_addr=local, remote_addr=remote, **kw)


class Link:
    """Carries datagrams between two cores; `drop` filters what is lost."""

    def __init__(self, a: IkeCore, b: IkeCore) -> None:
        self.a, self.b = a, b
        self.now = 0.0
        self.wire: list[bytes] = []
        self.events: dict[int, list[Event]] = {id(a): [], id(b): []}
        self.drop = lambda data, sender: False

    def run(self, max_rounds: int = 1000) -> int:
        """Deliver until both cores are quiet; returns the number of datagrams moved."""
        moved = 0
        for _ in range(max_rounds):
            progress = False
            for x, y in ((self.a, self.b), (self.b, self.a)):
                for d in x.datagrams_to_send():
                    progress = True
                    self.wire.append(d.data)
                    if self.drop(d.data, x):
                        continue
                    moved += 1
                    y.receive_datagram(d.data, src=d.src, dst=d.dst, now=self.now)
                self.events[id(x)] += x.events()
            if not progress:
                return moved
        raise AssertionError("the cores never went quiet")

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """Move the clock on, firing timers and delivering as it goes."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for c in (self.a, self.b):
                d = c.next_deadline()
                if d is not None and d <= self.now:
                    c.on_timer(self.now)
            self.run()

    def installed(self, core: IkeCore) -> list[ChildSaInstalled]:
        """The ChildSaInstalled events `core` produced so far."""
        return [e for e in self.events[id(core)] if isinstance(e, ChildSaInstalled)]


def pair(**kw: object) -> tuple[IkeCore, IkeCore, Link]:
    """Two cores configured for each other (keyword arguments go to both peer configs)."""
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", **kw)])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", **kw)])
    return a, b, Link(a, b)
