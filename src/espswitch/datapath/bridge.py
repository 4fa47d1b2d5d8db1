"""One bridge: L2 learning (the NORMAL action) with VLAN access and trunk ports.

Pure forwarding logic: frames are bytes, a batch comes in from one port, and the frames
leave as one batch per output port.  No I/O happens here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from espswitch.datapath.ports import Port, format_mac

if TYPE_CHECKING:
    from espswitch.datapath.datapath import Datapath

MAC_AGE = 300.0
MAC_MAX = 8192
TPID = b"\x81\x00"
ETH_IPV4 = b"\x08\x00"
ETH_ARP = b"\x08\x06"
ETH_IPV6 = b"\x86\xdd"


class Bridge:
    """A learning switch.  `ports` holds the ports in ofport order for stable flooding."""

    def __init__(self, dp: Datapath, name: str) -> None:
        self.dp = dp
        self.name = name
        self.ports: list[Port] = []
        # (vid, mac) -> [port, last_seen]
        self.macs: dict[tuple[int, bytes], list] = {}
        #: addresses of tunnel endpoints reached through this bridge (IPv4: 4 bytes, IPv6: 16)
        self.local_ips: frozenset[bytes] = frozenset()
        self.mac_age = MAC_AGE

    # --- ports ------------------------------------------------------------------------------
    def add_port(self, port: Port) -> None:
        self.ports.append(port)
        self.ports.sort(key=lambda p: p.ofport)

    def remove_port(self, port: Port) -> None:
        if port in self.ports:
            self.ports.remove(port)
        self.flush_port(port)

    def flush_port(self, port: Port) -> None:
        for key in [k for k, e in self.macs.items() if e[0] is port]:
            del self.macs[key]
        self.dp.fast_changed()

    def local_port(self) -> Port | None:
        for p in self.ports:
            if p.name == self.name:
                return p
        return None

    # --- housekeeping -----------------------------------------------------------------------
    def run(self, now: float) -> None:
        limit = now - self.mac_age
        aged = [k for k, e in self.macs.items() if e[1] < limit]
        for key in aged:
            del self.macs[key]
        if aged:
            self.dp.fast_changed()

    def fdb(self, now: float) -> list[tuple[Port, int, str, int]]:
        """(port, vlan, mac, age in seconds) for every learned MAC."""
        rows = [(e[0], k[0], format_mac(k[1]), int(now - e[1])) for k, e in self.macs.items()]
        rows.sort(key=lambda r: (r[0].ofport, r[1], r[2]))
        return rows

    # --- forwarding ---------------------------------------------------------------------------
    def process(self, in_port: Port, frames: list[bytes], count: bool = True) -> None:
        """Forward a batch received on `in_port`; the bridge owns the batch.

        `count=False` for frames the datapath itself sends from a bridge's internal port
        (tunnel output, ARP requests): they are not the internal device's traffic.
        """
        dp = self.dp
        now = dp.now
        st = in_port.stats
        if count:
            st["rx_packets"] += len(frames)
            st["rx_bytes"] += sum(map(len, frames))
        in_tag = in_port.tag
        in_trunks = in_port.trunks
        macs = self.macs
        local_ips = self.local_ips
        tunnels = dp.tunnels
        outputs: dict[Port, list[bytes]] = {}
        for frame in frames:
            if len(frame) < 14:
                st.drop("rx_malformed")
                continue
            et = frame[12:14]
            if et == TPID:
                if len(frame) < 18:
                    st.drop("rx_malformed")
                    continue
                vid = ((frame[14] & 0x0F) << 8) | frame[15]
                if in_tag is not None:
                    if vid != 0:
                        st.drop("rx_vlan_drops")
                        continue
                    vid = in_tag
                elif in_trunks is not None and vid not in in_trunks:
                    st.drop("rx_vlan_drops")
                    continue
                frame = frame[:12] + frame[16:]
                et = frame[12:14]
            elif in_tag is not None:
                vid = in_tag
            else:
                vid = 0
                if in_trunks is not None and 0 not in in_trunks:
                    st.drop("rx_vlan_drops")
                    continue
            src = frame[6:12]
            if not src[0] & 1:
                key = (vid, src)
                entry = macs.get(key)
                if entry is None:
                    if len(macs) < MAC_MAX:
                        macs[key] = [in_port, now]
                        dp.fast_gen += 1  # the fast path's MAC table is out of date
                elif entry[0] is not in_port:
                    entry[0] = in_port
                    entry[1] = now
                    dp.fast_gen += 1
                else:
                    entry[1] = now
            if et == ETH_IPV4:
                if (
                    local_ips
                    and vid == 0
                    and frame[30:34] in local_ips
                    and tunnels.receive(self, in_port, frame)
                ):
                    continue
            elif et == ETH_ARP:
                tunnels.snoop_arp(self, frame)
            elif et == ETH_IPV6 and local_ips:
                if vid == 0 and frame[38:54] in local_ips and tunnels.receive6(
                        self, in_port, frame):
                    continue
                tunnels.snoop_nd(self, frame)
            dst = frame[0:6]
            if not dst[0] & 1:
                entry = macs.get((vid, dst))
                if entry is not None:
                    out = entry[0]
                    if out is in_port:
                        continue
                    tagged = self._vlan_out(out, vid)
                    if tagged is None:
                        continue
                    lst = outputs.get(out)
                    if lst is None:
                        lst = outputs[out] = []
                    lst.append(frame if not tagged else _push_vlan(frame, vid))
                    continue
            # Flood: unknown unicast, broadcast, multicast.
            tagged_frame = None
            for out in self.ports:
                if out is in_port:
                    continue
                tagged = self._vlan_out(out, vid)
                if tagged is None:
                    continue
                if tagged:
                    if tagged_frame is None:
                        tagged_frame = _push_vlan(frame, vid)
                    f = tagged_frame
                else:
                    f = frame
                lst = outputs.get(out)
                if lst is None:
                    lst = outputs[out] = []
                lst.append(f)
        for out, lst in outputs.items():
            dp.transmit(out, lst)

    def output_known(self, in_port: Port, frames: list[bytes], dst: bytes) -> None:
        """Forward frames the datapath itself sends from `in_port`, all to unicast `dst`
        (tunnel output): one MAC lookup per batch instead of one per frame. Falls back to
        `process` when `dst` is not learned yet (the frames are then flooded)."""
        vid = in_port.tag or 0
        entry = self.macs.get((vid, dst))
        if entry is None or dst[0] & 1:
            self.process(in_port, frames, False)
            return
        src = frames[0][6:12]
        learned = self.macs.get((vid, src))
        if learned is not None:
            if learned[0] is not in_port:
                learned[0] = in_port
                self.dp.fast_changed()
            learned[1] = self.dp.now
        elif len(self.macs) < MAC_MAX:
            self.macs[(vid, src)] = [in_port, self.dp.now]
            self.dp.fast_changed()
        out = entry[0]
        if out is in_port:
            return
        tagged = self._vlan_out(out, vid)
        if tagged is None:
            return
        self.dp.transmit(out, [_push_vlan(f, vid) for f in frames] if tagged else frames)

    @staticmethod
    def _vlan_out(port: Port, vid: int) -> bool | None:
        """None: `port` does not carry `vid`; else whether the frame leaves tagged."""
        tag = port.tag
        if tag is not None:
            return False if tag == vid else None
        trunks = port.trunks
        if trunks is not None and vid not in trunks:
            return None
        return vid != 0


def _push_vlan(frame: bytes, vid: int) -> bytes:
    return frame[:12] + TPID + vid.to_bytes(2, "big") + frame[12:]
