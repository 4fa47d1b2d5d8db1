"""`espswitch demo`: two hypervisors, two VMs, one encrypted VXLAN tunnel, on this machine.

It builds the lab (network namespaces, a veth underlay, `espswitch start`, `ovs-vsctl`),
keys a `vxlanipsec` tunnel with fresh random keys, pings VM to VM, shows what an
eavesdropper on the underlay sees, shows `ipsec/show`, and removes everything it made,
also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Any

from espswitch.cli.lab import Lab, LabError
from espswitch.ipsec import TRANSFORM_NAMES, IpsecConfigError, parse_transform


def register(subparsers: Any) -> None:
    """Add `demo` to the `espswitch` subcommand parsers."""
    p = subparsers.add_parser(
        "demo", help="run the two-hypervisor encrypted VXLAN demo (root)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--esp", default="aes128gcm16",
                   help=f"ESP transform: {', '.join(TRANSFORM_NAMES)} (optionally -esn)")
    p.add_argument("--mode", choices=("transport", "tunnel"), default="transport",
                   help="ESP mode (default transport)")
    p.add_argument("--udp-encap", action="store_true",
                   help="carry ESP in UDP/4500 (ipsec_encapsulation=yes)")
    p.add_argument("--count", type=int, default=10, help="pings to send (default 10)")
    p.set_defaults(func=run_demo)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _keys(esp: str) -> tuple[dict[str, str], dict[str, str]]:
    t = parse_transform(esp)
    k12, k21 = os.urandom(t.keymat_len).hex(), os.urandom(t.keymat_len).hex()
    spi12, spi21 = (int.from_bytes(os.urandom(4), "big") | 0x1000 for _ in range(2))
    one = {"esp": esp, "spi_out": hex(spi12), "spi_in": hex(spi21), "esp_key_out": k12,
           "esp_key_in": k21}
    two = {"esp": esp, "spi_out": hex(spi21), "spi_in": hex(spi12), "esp_key_out": k21,
           "esp_key_in": k12}
    return one, two


def _eavesdrop(pcap: str) -> tuple[list[str], dict[str, int]]:
    """tcpdump's view of the underlay capture: a few lines and counts by kind."""
    out = subprocess.run(["tcpdump", "-nn", "-r", pcap, "ip"], capture_output=True,
                         text=True).stdout.splitlines()
    kinds = {"esp": 0, "udp-4500": 0, "vxlan-plaintext": 0, "other": 0}
    for line in out:
        if "ESP(" in line:
            kinds["esp"] += 1
        elif ".4500:" in line or ".4500 >" in line:
            kinds["udp-4500"] += 1
        elif ".4789:" in line or "VXLAN" in line:
            kinds["vxlan-plaintext"] += 1
        else:
            kinds["other"] += 1
    return out, kinds


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when VM-to-VM pings crossed and the underlay showed only ESP."""
    if os.geteuid() != 0:
        print("espswitch demo: run as root (it creates network namespaces and TAP devices)",
              file=sys.stderr)
        return 2
    try:
        opts = _keys(args.esp)
    except IpsecConfigError as e:
        print(f"espswitch demo: {e}", file=sys.stderr)
        return 2
    for o in opts:
        o["ipsec_mode"] = args.mode
        if args.udp_encap:
            o["ipsec_encapsulation"] = "yes"
    # Ctrl-C and SIGTERM both end in the lab's clean-up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _demo(args, opts)
    except LabError as e:
        print(f"espswitch demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("espswitch demo: interrupted; everything it made was removed", file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace, opts: tuple[dict[str, str], dict[str, str]]) -> int:
    _say(f"== Building two hypervisors and two VMs (vxlanipsec, {args.esp}, {args.mode} mode, "
         "fresh random keys)")
    with Lab(tunnel_type="vxlanipsec", tunnel_options=opts) as lab:
        hv1, hv2 = lab.hvs
        _say(f"   hv1 {hv1.underlay_ip} <- underlay veth -> hv2 {hv2.underlay_ip}; "
             f"vm1 {hv1.vm_ip}, vm2 {hv2.vm_ip}; namespaces {hv1.ns}, {hv2.ns}, ...")
        status = lab.vsctl(hv1, "get", "interface", "tun0", "status").stdout.strip()
        _say(f"   tun0 status: {status}")
        if not lab.wait_for_ping():
            _say("!! vm1 cannot reach vm2")
            _say(lab.appctl(hv1, "ipsec/show", check=False).stdout)
            return 1
        _say()
        _say(f"== vm1 pings vm2 ({args.count} packets) while an eavesdropper captures the "
             "underlay")
        with lab.capture(0) as pcap:
            ping = lab.ping(count=args.count, interval=0.1, extra=["-p", "73656372657421"])
        summary = [ln for ln in ping.stdout.splitlines() if "transmitted" in ln or "rtt" in ln]
        for line in summary:
            _say(f"   {line}")
        lines, kinds = _eavesdrop(pcap)
        _say()
        _say("== What the eavesdropper on the underlay sees (tcpdump):")
        for line in lines[:6]:
            _say(f"   {line}")
        if len(lines) > 6:
            _say(f"   ... {len(lines) - 6} more")
        with open(pcap, "rb") as f:
            leaked = b"secret!" in f.read()
        _say(f"   ESP packets: {kinds['esp']}, UDP/4500: {kinds['udp-4500']}, plaintext VXLAN: "
             f"{kinds['vxlan-plaintext']}, other IPv4: {kinds['other']}; ping payload "
             f"'secret!' visible: {'YES' if leaked else 'no'}")
        _say()
        _say("== ovs-appctl -t espswitchd ipsec/show (hv1)")
        for line in lab.appctl(hv1, "ipsec/show").stdout.splitlines():
            _say(f"   {line}")
        _say()
        _say("== Removing everything the demo made")
    ok = ping.returncode == 0 and not leaked and kinds["vxlan-plaintext"] == 0
    _say("== Done: " + ("VM traffic crossed the underlay encrypted." if ok else "FAILED"))
    return 0 if ok else 1
