"""IKE benchmark (not a test): IKE SA + first CHILD_SA setups per second.

The same espswitch initiator sets up SAs against an espswitch responder and against
strongSwan's charon (kernel-libipsec) as responder, in one run, over UDP between two network
namespaces (needs root and strongSwan). Prints the ratio and writes JSON:
    {"results": [{"responder": "espswitch", "setups_per_s": ...},
                 {"responder": "strongswan", "setups_per_s": ...}]}

Usage: python3 bench/ike.py [--setups N] [--window W] [--ike PROPOSAL] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.ike.strongswan import (
    ES_ADDR,
    ES_NET,
    PSK,
    SW_ADDR,
    SW_NET,
    Lab,
    strongswan_missing,
    swanctl_conf,
    udp_sockets,
)

from espswitch.ike import ChildConfig, ChildSaInstalled, Credentials, IkeCore, PeerConfig
from espswitch.ike.driver import IkeDriver


def initiator_peers(n: int, ike: str) -> list[PeerConfig]:
    """n identical peers towards 192.0.2.2, so that each setup is a new IKE SA."""
    return [PeerConfig(name=f"p{i}", local_addr=ES_ADDR, remote_addr=SW_ADDR,
                       local_id="espswitch.test", remote_id="charon.test",
                       credentials=Credentials(psk=PSK.encode()), ike_proposals=ike,
                       children=(ChildConfig(name="net", local_ts=ES_NET, remote_ts=SW_NET),),
                       encap=True, dpd_delay=3600, retransmit_timeout=2.0)
            for i in range(n)]


async def run_setups(lab: Lab, n: int, window: int, ike: str) -> float:
    """Set up n IKE SAs (at most `window` at once); returns setups per second."""
    done = asyncio.Event()
    count = {"n": 0}

    def on_event(ev: object) -> None:
        if isinstance(ev, ChildSaInstalled):
            count["n"] += 1
            if count["n"] >= n:
                done.set()
            nxt = count["n"] + window - 1
            if nxt < n:
                drv.initiate(f"p{nxt}")

    core = IkeCore(initiator_peers(n, ike))
    drv = IkeDriver(core, ES_ADDR, sockets=udp_sockets(lab.es_ns, ES_ADDR), on_event=on_event)
    await drv.start()
    try:
        t0 = time.perf_counter()
        for i in range(min(window, n)):
            drv.initiate(f"p{i}")
        await asyncio.wait_for(done.wait(), 60 + n)
        return n / (time.perf_counter() - t0)
    finally:
        drv.close()


async def espswitch_responder(lab: Lab, n: int, window: int, ike: str) -> float:
    """An espswitch responder in charon's namespace, same process."""
    resp = IkeCore([PeerConfig(name="es", local_addr=SW_ADDR, remote_addr=ES_ADDR,
                               local_id="charon.test", remote_id="espswitch.test",
                               credentials=Credentials(psk=PSK.encode()), ike_proposals=ike,
                               children=(ChildConfig(name="net", local_ts=SW_NET,
                                                     remote_ts=ES_NET),),
                               encap=True, dpd_delay=3600)])
    rdrv = IkeDriver(resp, SW_ADDR, sockets=udp_sockets(lab.sw_ns, SW_ADDR))
    await rdrv.start()
    try:
        return await run_setups(lab, n, window, ike)
    finally:
        rdrv.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", type=int, default=200)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--ike", default="aes128gcm16-prfsha256-x25519")
    ap.add_argument("--json", default="bench-ike.json")
    args = ap.parse_args()
    why = strongswan_missing()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    lab = Lab()
    try:
        es = asyncio.run(espswitch_responder(lab, args.setups, args.window, args.ike))
        lab.start_charon(swanctl_conf(ike=args.ike))
        sw = asyncio.run(run_setups(lab, args.setups, args.window, args.ike))
    finally:
        lab.close()
    results = {"ike": args.ike, "setups": args.setups, "window": args.window,
               "results": [{"responder": "espswitch", "setups_per_s": round(es, 1)},
                           {"responder": "strongswan", "setups_per_s": round(sw, 1)}]}
    print(f"espswitch responder:  {es:8.1f} setups/s")
    print(f"strongswan responder: {sw:8.1f} setups/s")
    print(f"ratio espswitch/strongswan: {es / sw:.2f}")
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
