"""The compiled poll loop (FastLoop) in a running espswitchd, and `other_config:fast-loop`.

With the fast path on, espswitchd's loop waits in C and runs the batches the pipelines take
whole without coming back to Python; their counters are folded into the ports' statistics
when it returns. What must hold: the switch counts exactly what the kernel's devices count
on both sides of it (the VM's TAP, the underlay's veth; of what the underlay sent, the
switch's frames are a part), the same with the loop on and off; `dpif/show`'s
loop_batches says the loop ran (and stays still when it is off).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from espswitch.cli.labkit import run
from espswitch.datapath import fast

from .ipsec_helpers import Keys, keyed_lab, received, wait_for

pytestmark = pytest.mark.net


def kernel_counts(ns: str, dev: str) -> tuple[int, int, int, int]:
    """(rx packets, rx bytes, tx packets, tx bytes) of device `dev` as the kernel counts."""
    out = run(["ip", "-s", "-j", "link", "show", "dev", dev], ns).stdout
    st = json.loads(out)[0]["stats64"]
    return st["rx"]["packets"], st["rx"]["bytes"], st["tx"]["packets"], st["tx"]["bytes"]


def switch_counts(lab, hv, port: str) -> tuple[int, int, int, int]:
    """(rx packets, rx bytes, tx packets, tx bytes) of espswitch's port, read at once."""
    out = lab.appctl(hv, "dpif/iface-show", port).stdout
    st = {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", out)}
    return (st.get("rx_packets", 0), st.get("rx_bytes", 0), st.get("tx_packets", 0),
            st.get("tx_bytes", 0))


def loop_batches(lab, hv) -> int:
    out = lab.appctl(hv, "dpif/show").stdout
    return int(re.search(r"loop_batches=(\d+)", out).group(1))


def delta(after, before):
    return tuple(a - b for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("loop", ["true", "false"])
def test_the_switch_counts_what_the_kernel_counts_with_the_fast_loop_on_and_off(
        netlab_ok, loop):
    if not fast.AVAILABLE:
        pytest.skip(fast.REASON)
    with keyed_lab(Keys.fresh("aes128gcm16")) as lab:
        for hv in lab.hvs:
            lab.vsctl(hv, "set", "Open_vSwitch", ".", f"other_config:fast-loop={loop}")
        assert lab.wait_for_ping()

        def sample():
            out = []
            for hv in lab.hvs:
                out.append((kernel_counts(hv.vm_ns, hv.tap), switch_counts(lab, hv, hv.tap),
                            kernel_counts(hv.ns, hv.underlay_dev),
                            switch_counts(lab, hv, hv.underlay_dev)))
            return out

        def settled():
            # Whatever the VMs' stacks still send (neighbour probes) has been forwarded.
            s = sample()
            return s if s == sample() else None

        batches = [loop_batches(lab, hv) for hv in lab.hvs]
        before = wait_for(settled, 20)
        assert before is not None
        assert received(lab.ping(200, 0.005)) == 200
        assert received(lab.ping(100, 0.005, size=1200, src=1)) == 100
        after = wait_for(settled, 20)
        assert after is not None
        for i, hv in enumerate(lab.hvs):
            vm_k, vm_s, ul_k, ul_s = (delta(a, b) for a, b in zip(after[i], before[i],
                                                                   strict=True))
            assert vm_k[2] >= 300, vm_k  # the pings went through this VM's device
            # What the VM sent is what the switch received from it, and the other way.
            assert (vm_s[0], vm_s[1]) == (vm_k[2], vm_k[3]), (hv.tap, vm_k, vm_s)
            assert (vm_s[2], vm_s[3]) == (vm_k[0], vm_k[1]), (hv.tap, vm_k, vm_s)
            # Every frame the underlay NIC received, the switch read. (What it sent is a
            # part of what the device sent: the hypervisor's kernel sends on it too, its
            # own IPv6 neighbour discovery.)
            assert (ul_s[0], ul_s[1]) == (ul_k[0], ul_k[1]), (hv.underlay_dev, ul_k, ul_s)
            assert 300 <= ul_s[2] <= ul_k[2] and ul_s[3] <= ul_k[3], (ul_k, ul_s)
            ran = loop_batches(lab, hv) - batches[i]
            if loop == "true":
                assert ran >= 300, ran  # both directions of nearly every ping
            else:
                assert ran == 0, ran
        if loop == "true":
            # A value that is neither true nor false: warned about, the loop stays on.
            hv1 = lab.hvs[0]
            lab.vsctl(hv1, "set", "Open_vSwitch", ".", "other_config:fast-loop=maybe")
            with open(os.path.join(hv1.dir, "espswitchd.log")) as f:
                assert "other_config:fast-loop must be true or false" in f.read()
            before = loop_batches(lab, hv1)
            assert received(lab.ping(20, 0.005)) == 20
            assert loop_batches(lab, hv1) - before >= 20
