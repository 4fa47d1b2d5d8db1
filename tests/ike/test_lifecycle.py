"""The ends of IKE SAs: old SAs after a rekey (RFC 7296 §2.8), INITIAL_CONTACT (§2.4),
spoofed IKE_SA_INIT responses (§2.4), and the sans-IO rule for the package's imports."""

from __future__ import annotations

import ast
import pathlib

from espswitch.ike import ChildSaDeleted, IkeCore, IkeSaDown

from .helpers import A_ADDR, B_ADDR, Link, pair, peer

_INFORMATIONAL = 37


def _old_sa_traffic(old, exchange=_INFORMATIONAL):
    """A drop filter for the messages of IKE SA `old` of one exchange type."""
    spis = old.spi_i + old.spi_r

    def match(data: bytes) -> bool:
        return data[:16] == spis and data[18] == exchange
    return match


def test_rekey_initiator_deletes_the_old_ike_sa():
    a, b, link = pair()
    a.initiate("b", 0.0)
    link.run()
    old = a.ike_sas()[0]
    a.rekey_ike("b", 1.0)
    link.run()
    assert [s.spi_i for s in a.ike_sas()] == [s.spi_i for s in b.ike_sas()]
    assert len(a.ike_sas()) == len(b.ike_sas()) == 1 and a.ike_sas()[0].spi_i != old.spi_i
    assert [e.reason for e in link.events[id(b)] if isinstance(e, IkeSaDown)] == ["rekeyed"]


def test_replaced_ike_sa_nobody_deletes_goes_after_a_timeout():
    """The rekey initiator's Delete never arrives: the responder's old SA still goes."""
    a, b, link = pair(retransmit_timeout=0.5, retransmit_base=2.0, retransmit_tries=3)
    a.initiate("b", 0.0)
    link.run()
    old = a.ike_sas()[0]
    is_delete = _old_sa_traffic(old)
    link.drop = lambda data, sender: sender is a and is_delete(data)
    a.rekey_ike("b", 1.0)
    link.run()
    assert len(b.ike_sas()) == 2  # the old one waits for its delete
    assert [s.state for s in b.ike_sas()].count("rekeyed") == 1
    link.advance(0.5 + 1.0 + 2.0 + 0.5)  # past the give-up time of the retransmissions
    assert len(a.ike_sas()) == len(b.ike_sas()) == 1
    assert a.ike_sas()[0].spi_i == b.ike_sas()[0].spi_i != old.spi_i
    assert [s.state for s in b.ike_sas()] == ["established"]
    assert len(b.ike_sas()[0].children) == 1
    downs = [e for e in link.events[id(b)] if isinstance(e, IkeSaDown)]
    assert [e.reason for e in downs] == ["rekeyed"]
    assert not [e for e in link.events[id(b)] if isinstance(e, ChildSaDeleted)]
    assert b.next_deadline() is not None and b.next_deadline() > link.now


def test_initial_contact_from_a_restarted_peer_replaces_its_stale_sa_at_once():
    a, b, link = pair()
    a.initiate("b", 0.0)
    link.run()
    stale = b.ike_sas()[0]
    # a restarts: a new core, same configuration, knows nothing of the old SA.
    a2 = IkeCore([peer(A_ADDR, B_ADDR, "b")])
    link2 = Link(a2, b)
    link2.now = 5.0
    a2.initiate("b", 5.0)
    link2.run()
    (sa_b,) = b.ike_sas()
    assert sa_b.spi_i == a2.ike_sas()[0].spi_i != stale.spi_i
    assert len(sa_b.children) == 1
    down = [e for e in link2.events[id(b)] if isinstance(e, IkeSaDown)]
    assert [(e.ike_id, e.reason) for e in down] == [
        (stale.ike_id, "peer restarted (INITIAL_CONTACT)")]
    gone = [e for e in link2.events[id(b)] if isinstance(e, ChildSaDeleted)]
    assert [e.spi_in for e in gone] == [stale.children[0].spi_in]
    # The stale SA's events come before the new SA's, so the datapath swaps cleanly.
    kinds = [type(e).__name__ for e in link2.events[id(b)]]
    assert kinds.index("IkeSaDown") < kinds.index("IkeSaUp")
    # The old a never hears of it again (it is gone); a2 keeps its SA.
    assert [s.state for s in a2.ike_sas()] == ["established"]


def test_no_initial_contact_while_another_sa_with_the_peer_exists():
    """A second IKE SA with a live peer (a crossing initiation) must not kill the first."""
    for _ in range(20):
        a, b, link = pair()
        a.initiate("b", 0.0)
        b.initiate("a", 0.0)
        link.run()
        link.advance(1.0)
        assert len(a.ike_sas()) == len(b.ike_sas()) == 1
        reasons = [e.reason for c in (a, b) for e in link.events[id(c)]
                   if isinstance(e, IkeSaDown)]
        assert "peer restarted (INITIAL_CONTACT)" not in reasons


def _is_init_response(data: bytes) -> bool:
    return data[18] == 34 and bool(data[19] & 0x20)


def _spoof_first(a, link, mangle, lose_real=False):
    """Before b's IKE_SA_INIT response reaches a, a mangled copy of it does."""
    state = {"done": False}

    def drop(data, sender):
        if sender is not a and _is_init_response(data) and not state["done"]:
            state["done"] = True
            a.receive_datagram(mangle(data), src=(B_ADDR, 500), dst=(A_ADDR, 500),
                               now=link.now)
            return lose_real
        return False
    link.drop = drop


def test_spoofed_corrupted_init_response_first_does_not_block_the_real_one():
    """Whatever byte of the response a spoofer flips, the real response that follows
    still brings the IKE SA and its CHILD_SA up, at once and on both sides."""
    for pos in range(0, 260, 2):
        a, b, link = pair()

        def flip(data, pos=pos):
            bad = bytearray(data)
            bad[pos % len(bad)] ^= 0x5A
            return bytes(bad)
        _spoof_first(a, link, flip)
        a.initiate("b", 0.0)
        link.run()
        assert [s.state for s in a.ike_sas()] == ["established"], (pos, list(a.errors))
        assert len(link.installed(a)) == len(link.installed(b)) == 1, pos
        assert [s.spi_r for s in a.ike_sas()] == [s.spi_r for s in b.ike_sas()]
        assert not [e for e in link.events[id(a)] if isinstance(e, IkeSaDown)], pos
        ev_a, ev_b = link.installed(a)[0], link.installed(b)[0]
        assert ev_a.keymat_in == ev_b.keymat_out and ev_a.spi_in == ev_b.spi_out
        link.advance(60.0, step=5.0)  # and it stays up: the losers left nothing behind
        assert [s.state for s in a.ike_sas()] == ["established"]
        assert [s.state for s in b.ike_sas()] == ["established"]


def test_garbage_init_response_ignored_and_retransmission_gets_the_real_one():
    """The real response is lost and a garbled copy arrives: the initiator keeps waiting,
    retransmits the same IKE_SA_INIT, and the responder's cached answer brings it up."""
    for mangle in (lambda d: d[:-9],  # truncated
                   lambda d: d[:40] + bytes(8) + d[48:],  # SA payload wiped
                   lambda d: d.replace(d[-40:], bytes(40))):  # NAT-D hash zeroed
        a, b, link = pair(retransmit_timeout=1.0)
        _spoof_first(a, link, mangle, lose_real=True)
        a.initiate("b", 0.0)
        link.run()
        assert [s.state for s in a.ike_sas()] in (["init-sent"], ["auth-sent"])
        link.advance(1.0)
        assert [s.state for s in a.ike_sas()] == ["established"], list(a.errors)
        assert len(link.installed(a)) == len(link.installed(b)) == 1
        inits = [m for m in link.wire if m[18] == 34 and not m[19] & 0x20]
        assert len(inits) == 2 and inits[0] == inits[1]


def test_spoofed_refusal_with_an_sa_payload_is_ignored():
    """An error notify next to SA, KE and Nonce is a mangled response, not a refusal."""
    from espswitch.ike.message import NotifyPayload, encode_message, parse_message

    def with_error(data):
        msg = parse_message(data)
        forged = type(msg)(spi_i=msg.spi_i, spi_r=msg.spi_r, exchange=msg.exchange,
                           flags=msg.flags, mid=msg.mid,
                           payloads=(NotifyPayload(notify=14), *msg.payloads))
        return encode_message(forged)
    a, _b, link = pair()
    _spoof_first(a, link, with_error)
    a.initiate("b", 0.0)
    link.run()
    assert [s.state for s in a.ike_sas()] == ["established"]


def test_import_rule_only_the_driver_touches_sockets_and_clocks():
    """`ike/` is sans-IO: no socket, asyncio, time, select or threading but in driver.py."""
    pkg = pathlib.Path(__file__).resolve().parents[2] / "src" / "espswitch" / "ike"
    banned = {"socket", "asyncio", "time", "select", "selectors", "threading"}
    files = sorted(pkg.glob("*.py"))
    assert len(files) > 5
    for f in files:
        if f.name == "driver.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
                names = ["__import__"]
            for n in names:
                assert n.split(".")[0] not in banned | {"__import__", "importlib"}, (f.name, n)
    init = (pkg / "__init__.py").read_text()
    assert "driver" not in [n for node in ast.walk(ast.parse(init))
                            if isinstance(node, ast.ImportFrom) for n in (node.module or "",)]

