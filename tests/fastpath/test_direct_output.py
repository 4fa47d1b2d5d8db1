"""The compiled pipelines write their hits to the devices themselves (issue 10).

With an installed output (`RxTable.set_outputs`: a TAP's or an AF_PACKET socket's file
descriptor), `rx_burst` and `tx_burst` write what they forward exactly as the device's
own `send` would (GRO runs with virtio-net headers; one sendmmsg message a frame) and
hand Python only the counts. Here the in-memory devices write to socket pairs as the real
ones write (`MemoryDevice(wire=...)`), so the bytes that reach each "wire" are compared
between a fast and a Python hypervisor, with every counter beside them.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espswitch.datapath.fast import _fastpath
from fastpath import test_encap_pipelines as encap
from fastpath import test_rx_pipeline as rx
from fastpath import test_tx_pipeline as tx
from fastpath.diff import PIPELINES


def rx_both(batches: list[list[str]]):
    on, off = rx.hypervisor(True, wire=True), rx.hypervisor(False, wire=True)
    peer = rx.Peer()
    for batch in batches:
        frames = [peer.make(on, k) for k in batch]
        on.inject("eth0", *frames)
        off.inject("eth0", *frames)
        PIPELINES["rx frames"] += len(frames)
        assert rx.state(on) == rx.state(off), batch
    return on, off


def tx_both(batches: list[list[str]], vnet: bool = False):
    on, off = tx.hypervisor(True, wire=True), tx.hypervisor(False, wire=True)
    for hv in (on, off):
        hv.dp.ports["vm"].vnet = vnet
    n = 0
    for batch in batches:
        frames = []
        for k in batch:
            n += 1
            frames.append(tx.make_vnet(on, k, n) if vnet else tx.make(on, k, n))
        on.inject("vm", *frames)
        off.inject("vm", *frames)
        PIPELINES["tx offload reads" if vnet else "tx frames"] += len(frames)
        assert tx.state(on) == tx.state(off), batch
    return on, off


def test_hits_reach_the_vm_without_a_python_send() -> None:
    on, off = rx.hypervisor(True, wire=True), rx.hypervisor(False, wire=True)
    peer = rx.Peer()
    for hv in (on, off):
        hv.dev("vm").send_calls = 0
    sent = on.dp.ports["vm"].stats["tx_packets"]
    for _ in range(3):  # the first batch is a miss (the router's MAC is learned)
        frames = [peer.make(on, "valid") for _ in range(4)]
        on.inject("eth0", *frames)
        off.inject("eth0", *frames)
        assert rx.state(on) == rx.state(off)
    assert on.dp._fast.hits == 8
    assert on.dev("vm").send_calls == 1 and off.dev("vm").send_calls == 3
    assert on.dp.ports["vm"].stats["tx_packets"] == sent + 12


def test_sealed_frames_reach_the_nic_without_a_python_send() -> None:
    on, off = tx.hypervisor(True, wire=True), tx.hypervisor(False, wire=True)
    for hv in (on, off):
        hv.dev("eth0").send_calls = 0
    sent = on.dp.ports["eth0"].stats["tx_packets"]
    for _ in range(3):
        frames = [tx.make(on, "plain", i) for i in range(5)]
        on.inject("vm", *frames)
        off.inject("vm", *frames)
        wire = on.dev("eth0").take()
        assert wire == off.dev("eth0").take() and len(wire) == 5
    assert on.dp._fast.tx_hits == 15
    assert on.dev("eth0").send_calls == 0 and off.dev("eth0").send_calls == 3
    assert on.dp.ports["eth0"].stats["tx_packets"] == sent + 15


def test_every_receive_kind_alone_writes_what_the_python_path_writes() -> None:
    for kind in rx.KINDS:
        rx_both([["valid"], [kind, "valid"], ["valid", kind]])


def test_every_transmit_kind_alone_writes_what_the_python_path_writes() -> None:
    for kind in tx.KINDS:
        tx_both([["plain"], [kind, "plain"], ["plain", kind]])
    for kind in tx.VNET_KINDS:
        tx_both([[kind], [kind, kind]], vnet=True)


def test_a_replaced_nic_gets_the_frames_from_then_on() -> None:
    hv = tx.hypervisor(True, wire=True)
    port = hv.dp.ports["eth0"]
    old = port.dev
    t = hv.dp.now
    hv.devs.system_names.discard("eth0")
    hv.dp.run(t + 2)
    hv.inject("vm", tx.make(hv, "plain", 1))
    assert port.stats["tx_link_down"] == 1 and old.closed
    hv.devs.system_names.add("eth0")
    hv.devs.generation["eth0"] = 1
    hv.dp.run(t + 4)
    new = port.dev
    assert new is not old
    new.send_calls = 0
    # The peer hypervisor's MAC is learned again on the new device, then sealed frames
    # go out through it, written by the compiled pipeline.
    tx.learn(hv)
    hits = hv.dp._fast.tx_hits
    hv.inject("vm", *[tx.make(hv, "plain", i) for i in range(3)])
    assert hv.dp._fast.tx_hits == hits + 3
    assert len(new.take()) == 3 and new.send_calls == 0


def test_output_kinds_are_checked() -> None:
    table = _fastpath.RxTable()
    table.set_outputs([None, (_fastpath.OUTPUT_TAP, 5), (_fastpath.OUTPUT_PACKET, 6)])
    for bad in ([(9, 5)], [(_fastpath.OUTPUT_TAP, -1)]):
        try:
            table.set_outputs(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(rx.KINDS + ("valid",) * 6), min_size=1, max_size=8),
                max_size=6))
def test_random_receive_batches_write_what_the_python_path_writes(batches) -> None:
    rx_both(batches)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(tx.KINDS), min_size=1, max_size=12), max_size=6))
def test_random_transmit_batches_write_what_the_python_path_writes(batches) -> None:
    tx_both(batches)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(tx.VNET_KINDS), min_size=1, max_size=8), max_size=5))
def test_random_offload_batches_write_what_the_python_path_writes(batches) -> None:
    tx_both(batches, vnet=True)


@pytest.mark.parametrize("v", encap.VARIANTS, ids=encap.ids)
def test_every_encapsulation_and_underlay_is_written_by_the_compiled_code(v) -> None:
    hv = encap.hypervisor(v, True, wire=True)
    peer = encap.Peer(v)
    peer.n = peer.sa.seq = 1
    for name in ("vm", "eth0"):
        hv.dev(name).send_calls = 0
    hv.inject("eth0", *[peer.make(hv, "valid") for _ in range(4)])
    hv.inject("vm", *[encap.make(hv, "plain", i) for i in range(4)])
    assert (hv.dp._fast.hits, hv.dp._fast.tx_hits) == (4, 4)
    assert len(hv.dev("vm").take()) == 4 and len(hv.dev("eth0").take()) == 4
    assert hv.dev("vm").send_calls == 0 and hv.dev("eth0").send_calls == 0


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
@pytest.mark.parametrize("v", encap.VARIANTS, ids=encap.ids)
def test_every_encapsulation_and_underlay_writes_what_the_python_path_writes(v, rnd) -> None:
    rx_kinds = ("valid",) * 12 + encap.rx_kinds(v)
    tx_kinds = ("plain",) * 10 + encap.TX_KINDS
    script = []
    for _ in range(12):
        if rnd.random() < 0.5:
            script.append(("eth0", [rnd.choice(rx_kinds) for _ in range(rnd.randint(1, 30))]))
        else:
            script.append(("vm", [rnd.choice(tx_kinds) for _ in range(rnd.randint(1, 30))]))
    encap.run_both(v, script, wire=True)
    kinds = ("tso",) * 6 + ("plain",) * 4 + encap.VNET_KINDS
    encap.run_both(v, [("vm", [rnd.choice(kinds) for _ in range(rnd.randint(1, 8))])
                       for _ in range(6)], vnet=True, wire=True)
