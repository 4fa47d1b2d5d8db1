"""Without the compiled module the switch still runs, on the Python engine.

The module's absence is simulated in a fresh interpreter by making its import fail."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    sys.modules["espswitch.datapath.fast._fastpath"] = None  # the import now fails
    from espswitch.datapath import fast
    from espswitch.ipsec import DropReason, InboundSA, OutboundSA, SaParams
    assert not fast.AVAILABLE and "not available" in fast.REASON, fast.REASON
    p = SaParams(spi=0x1001, transform="aes128gcm16", keymat=os.urandom(20))
    out, inb = fast.make_outbound_sa(p), fast.make_inbound_sa(p)
    assert type(out) is OutboundSA and type(inb) is InboundSA
    assert not fast.is_compiled(out) and not fast.supports(p.transform)
    sealed = fast.seal_batch(out, [b"a", b"bb"], 17)
    assert fast.open_batch(inb, sealed + [sealed[0]]) == [
        (17, b"a"), (17, b"bb"), DropReason.REPLAYED]
    import espswitch.vswitchd.daemon  # the switch imports
    from espswitch.datapath import Datapath
    from espswitch.datapath.devices import MemoryDevices
    dp = Datapath(MemoryDevices())
    assert not dp.fast_path and "fast-path: disabled (compiled" in dp.show(), dp.show()
    dp.add_bridge("br0")
    tun = dp.add_port("br0", "t0", "vxlanipsec", {
        "remote_ip": "10.0.0.2", "spi_out": "0x1001", "spi_in": "0x1002",
        "esp_key_out": "11" * 20, "esp_key_in": "22" * 20})
    assert type(tun.esp.sa_out) is OutboundSA and "esp_engine=python" in tun.describe()
    print("fallback ok:", fast.REASON)
""")


def test_without_the_module_everything_runs_on_the_python_engine() -> None:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "fallback ok: compiled fast path not available" in res.stdout
