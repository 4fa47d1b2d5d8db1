"""The I/O shell: Linux devices behind ports (TAP via /dev/net/tun, AF_PACKET sockets).

Everything here is thin: open a device, read a batch of frames into a preallocated buffer,
write frames.  `MemoryDevices` stands in for the kernel in unit tests of the forwarding core.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import socket
import struct
import threading
from collections.abc import Sequence

from espswitch.datapath import fast
from espswitch.datapath.errors import PortError
from espswitch.datapath.gro import VNET_HDR_LEN, coalesce
from espswitch.datapath.gso import complete

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
# What a VM port's reader takes (linux/if_tun.h): partial checksums, TCPv4 segmentation
# (with ECN's CWR on the first segment only). TSO for IPv6 and UDP is left to the kernel.
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO_ECN = 0x01, 0x02, 0x08
TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
SIOCSIFMTU = 0x8922
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_IGNORE_OUTGOING = 23
SO_SNDBUFFORCE = 32  # socket(7): root may exceed wmem_max
SO_RCVBUFFORCE = 33
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
PACKET_RX_RING = 5
PACKET_VERSION = 10
TPACKET_V2 = 1
RING_BLOCK = 1 << 16
RING_BYTES = 4 << 20
# struct tpacket2_hdr: status, len, snaplen, mac, net, sec, nsec, vlan_tci, vlan_tpid
_TP2_HDR = struct.Struct("=IIIH2x8xHH")
_U32_NATIVE = struct.Struct("=I")
TP_STATUS_VLAN_TPID_VALID = 0x40
# struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, vlan_tpid
_AUX_VLAN = struct.Struct("=I12xHH")
_VLAN_TAG = struct.Struct("!HH")
AUX_SPACE = socket.CMSG_SPACE(20)
TUNGETDEVNETNS = 0x54E3
TUNGETIFF = 0x800454D2
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux
NETNS_DIR = "/run/netns"
TRACK_INTERVAL = 0.5  # an ioctl and an fstat per TAP device: cheap
BUF_SIZE = 65536 + 64
SOCK_BUF = 4 * 1024 * 1024


def check_ifname(name: str) -> None:
    """Raise PortError unless `name` can name a Linux network device."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
        raise PortError(f"'{name}' is not a valid Linux device name (1 to 15 characters)")


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def _hwaddr(name: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, _ifreq(name))
    return res[18:24]


def _set_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _ifreq(name))
        flags = struct.unpack_from("H", res, 16)[0]
        if not flags & IFF_UP:
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))


def _read_sys(name: str, attr: str) -> str | None:
    try:
        with open(f"/sys/class/net/{name}/{attr}") as f:
            return f.read().strip()
    except OSError:
        return None


SendResult = tuple[int, list[int], list[int]]


def device_mtu(name: str) -> int | None:
    """The MTU of a device in this network namespace, or None if there is no such device."""
    text = _read_sys(name, "mtu")
    return int(text) if text and text.isdigit() else None


def _set_mtu(name: str, mtu: int) -> None:
    """SIOCSIFMTU on the device `name` of this thread's network namespace; OSError if the
    device is not there or the kernel refuses the value."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si12x", name.encode()[:15], mtu))


def set_device_mtu(name: str, mtu: int) -> bool:
    """Set a device's MTU (SIOCSIFMTU); False if it is not here or the kernel refused."""
    try:
        _set_mtu(name, mtu)
        return True
    except OSError:
        return False


def _in_netns(nsfd: int, work):
    """work() run in the network namespace `nsfd` refers to, by a helper thread (setns
    changes only the calling thread's namespace, and the thread ends with it); what it
    returns, or the OSError it raised."""
    result: list = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(nsfd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            result.append(work())
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=run, name="netns-work")
    t.start()
    t.join()
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


# With the compiled module built: one sendmmsg(2) per 64 frames instead of one send(2)
# each (the same results, counted the same way).
_send_frames = fast._fastpath.send_frames if fast.AVAILABLE else None
# ... and TAP writes coalesced (gro.coalesce) and gathered with writev(2) in C.
_tap_send = fast._fastpath.tap_send if fast.AVAILABLE else None
# TapDevice.recv_raw: each read straight into its bytes object
_tap_read = fast._fastpath.tap_read if fast.AVAILABLE else None
# PacketSocketDevice.recv_ring: frames left in their ring slots
_ring_take = fast._fastpath.ring_take if fast.AVAILABLE else None


def ring_walk(ring: mmap.mmap | bytearray, head: int, fs: int, nr: int,
              limit: int) -> tuple[list[bytes], int]:
    """Up to `limit` frames from a TPACKET_V2 ring of `nr` slots of `fs` bytes, from slot
    `head`, each slot handed back to the kernel; (frames, next head). A frame cut to the
    slot is dropped; a VLAN tag the kernel moved to metadata is put back."""
    out = []
    unpack_from = _TP2_HDR.unpack_from
    for _ in range(limit):
        off = head * fs
        status, length, snaplen, mac, tci, tpid = unpack_from(ring, off)
        if not status & TP_STATUS_USER:
            break
        if length == snaplen and mac + snaplen <= fs:
            frame = bytes(ring[off + mac : off + mac + snaplen])
            if status & TP_STATUS_VLAN_VALID and snaplen >= 12:
                if not status & TP_STATUS_VLAN_TPID_VALID or not tpid:
                    tpid = 0x8100
                frame = frame[:12] + _VLAN_TAG.pack(tpid, tci) + frame[12:]
            out.append(frame)
        _U32_NATIVE.pack_into(ring, off, TP_STATUS_KERNEL)  # hand the slot back
        head = head + 1 if head + 1 < nr else 0
    return out, head


# The ring walked in C when the compiled module is built (the same frames, the same slots).
_ring_read = fast._fastpath.ring_read if fast.AVAILABLE else ring_walk


def _send_all(write, frames: list[bytes]) -> SendResult:
    """Write each frame; return (sent, lengths dropped, lengths too big for the link)."""
    sent = 0
    dropped: list[int] = []
    too_big: list[int] = []
    for f in frames:
        try:
            write(f)
            sent += 1
        except OSError as e:
            (too_big if e.errno == errno.EMSGSIZE else dropped).append(len(f))
    return sent, dropped, too_big


def _attach_tun(name: str, persist: bool) -> int:
    """Open /dev/net/tun and create or attach the TAP device `name` (OSError on failure)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # With a virtio-net header on every frame, writes can carry coalesced TCP segments.
        fcntl.ioctl(
            fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        )
        if persist:
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError:
        os.close(fd)
        raise
    return fd


def _attach_tun_in(netns_path: str, name: str, persist: bool) -> int:
    """Attach the TAP device `name` that lives in another network namespace: a tun file
    belongs to the namespace it was opened in, so it is opened from there."""
    with open(netns_path) as ns:
        return _in_netns(ns.fileno(), lambda: _attach_tun(name, persist))


class TapDevice:
    """A TAP device (no packet info header); persistent devices outlive a crash."""

    def __init__(self, name: str, persist: bool = False, fd: int | None = None,
                 offload: bool = False) -> None:
        check_ifname(name)
        self.name = name
        self.persist = persist
        #: reads start with a virtio-net header that matters (offloads are on)
        self.vnet = False
        self.next_track = 0.0
        try:
            fd = _attach_tun(name, persist) if fd is None else fd
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise PortError(f"cannot create TAP device '{name}': it is in use") from None
            if e.errno == errno.EINVAL:
                raise PortError(
                    f"cannot create TAP device '{name}': a non-TAP device has that name"
                ) from None
            if e.errno in (errno.ENOENT, errno.ENODEV, errno.EACCES, errno.EPERM):
                raise PortError(f"cannot open /dev/net/tun: {e.strerror}") from None
            raise PortError(f"cannot create TAP device '{name}': {e.strerror}") from None
        self.fd = fd
        try:
            self.mac = _hwaddr(name)
        except OSError:
            self.mac = b"\0" * 6
        self._buf = bytearray(BUF_SIZE)
        self._mv = memoryview(self._buf)
        self._bufs = [self._buf]
        if offload:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS)
                self.vnet = True
            except OSError:
                pass  # an old kernel: complete frames, as without offloads

    def fileno(self) -> int:
        return self.fd

    def link_state(self) -> str:
        return "up"

    def _where(self) -> tuple[str, int | None]:
        """The device's name now (a VM may have renamed it) and a descriptor of its
        network namespace if that is not ours (the caller closes it), else None."""
        res = fcntl.ioctl(self.fd, TUNGETIFF, bytes(IFREQ_SIZE))
        name = res[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        try:
            nsfd = fcntl.ioctl(self.fd, TUNGETDEVNETNS)
        except OSError:
            return name, None
        if os.fstat(nsfd).st_ino == os.stat("/proc/self/ns/net").st_ino:
            os.close(nsfd)
            return name, None
        return name, nsfd

    def set_mtu(self, mtu: int) -> str | None:
        """Set the device's MTU, in whichever namespace the VM's side now is; None, or
        why the kernel refused."""
        try:
            name, nsfd = self._where()
            if nsfd is None:
                _set_mtu(name, mtu)
            else:
                try:
                    _in_netns(nsfd, lambda: _set_mtu(name, mtu))
                finally:
                    os.close(nsfd)
        except OSError as e:
            return e.strerror or str(e)
        self._mtu = mtu
        return None

    def mtu(self) -> int | None:
        """The device's MTU where it can be read without entering another namespace; for
        a device moved into a VM's, the MTU espswitchd last set (None if it never did)."""
        mtu = device_mtu(self.name)
        return mtu if mtu is not None else getattr(self, "_mtu", None)

    def netns_inode(self) -> int | None:
        """The inode of the network namespace the device lives in now."""
        try:
            nsfd = fcntl.ioctl(self.fd, TUNGETDEVNETNS)
        except OSError:
            return None
        try:
            return os.fstat(nsfd).st_ino
        finally:
            os.close(nsfd)

    def recv_batch(self, limit: int = 32) -> list[bytes]:
        out = []
        readv, fd, bufs, mv = os.readv, self.fd, self._bufs, self._mv
        for _ in range(limit):
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                break
            except OSError:
                break
            if self.vnet:
                # Offloads are on: the header may ask for a checksum or segmentation.
                frames = complete(mv[:n].tobytes())
                if frames:
                    out.extend(frames)
            else:
                # No offloads are enabled, so the kernel sends complete frames and the
                # virtio-net header says nothing: drop it.
                out.append(mv[VNET_HDR_LEN:n].tobytes())
        return out

    def recv_raw(self, limit: int = 32) -> list[bytes]:
        """Up to `limit` reads as they come, each with its virtio-net header (with
        offloads on, one read may stand for up to 45 frames: `gso.complete`)."""
        if _tap_read is not None:
            return _tap_read(self.fd, limit, BUF_SIZE)
        out = []
        readv, fd, bufs, mv = os.readv, self.fd, self._bufs, self._mv
        for _ in range(limit):
            try:
                n = readv(fd, bufs)
            except OSError:  # BlockingIOError: nothing more
                break
            out.append(mv[:n].tobytes())
        return out

    def fast_output(self) -> tuple[int, int] | None:
        """How the compiled pipelines write to this device themselves, exactly as `send`
        (RxTable.set_outputs); None without the compiled module."""
        if _tap_send is None or self.fd < 0:
            return None
        return fast._fastpath.OUTPUT_TAP, self.fd

    def send(self, frames: list[bytes]) -> SendResult:
        """Write every frame, consecutive TCP segments merged; (sent, dropped, too big)."""
        if _tap_send is not None:
            return _tap_send(self.fd, frames)
        writev, fd = os.writev, self.fd
        sent = 0
        dropped: list[int] = []
        too_big: list[int] = []
        for vnet, frame, count in coalesce(frames):
            try:
                writev(fd, (vnet, frame))
                sent += count
            except OSError as e:
                # Counted per original frame, as if they had been written one by one.
                (too_big if e.errno == errno.EMSGSIZE else dropped).extend(
                    [len(frame) // count] * count
                )
        return sent, dropped, too_big

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.persist:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, TUNSETPERSIST, 0)
        os.close(self.fd)
        self.fd = -1


RX_OFFLOADS = ("rx-gro", "rx-lro", "rx-gro-hw", "rx-gro-list")


def _disable_rx_offloads(name: str) -> None:
    """Best effort: coalesced frames (GRO/LRO) would reach a packet socket larger than the
    MTU with stale checksums, so the datapath turns coalescing off on the NICs it owns."""
    try:
        from pyroute2 import Ethtool

        e = Ethtool()
        try:
            f = e.get_features(name)
            changed = False
            for feat in RX_OFFLOADS:
                if feat in f.features and f.features[feat].enable:
                    f.features[feat].enable = False
                    changed = True
            if changed:
                e.set_features(name, f)
        finally:
            e.close()
    except Exception:
        pass  # not supported by the driver, or fixed: nothing to do


class PacketSocketDevice:
    """An existing Linux device on an AF_PACKET socket: promiscuous, own output ignored."""

    def __init__(self, name: str) -> None:
        check_ifname(name)
        self.name = name
        try:
            ifindex = socket.if_nametoindex(name)
        except OSError:
            raise PortError(f"system device '{name}' does not exist") from None
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            # The kernel strips VLAN tags into metadata; auxdata gives them back.
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
            sock.bind((name, ETH_P_ALL))
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            _set_up(name)
            _disable_rx_offloads(name)
            self.mac = _hwaddr(name)
        except OSError as e:
            sock.close()
            raise PortError(f"cannot attach system device '{name}': {e.strerror}") from None
        sock.setblocking(False)
        self.sock = sock
        self.ifindex = ifindex
        self.tx_sock = self._open_tx(name, sock)
        self._buf = bytearray(BUF_SIZE)
        self._mv = memoryview(self._buf)
        self._bufs = [self._buf]
        self._ring: mmap.mmap | None = None
        try:
            self._setup_ring(name)
        except OSError:
            self._ring = None  # no PACKET_MMAP: one recvmsg() per frame, as before

    @staticmethod
    def _open_tx(name: str, rx: socket.socket) -> socket.socket:
        """A second socket for what we send, bound with protocol 0 so it receives
        nothing. Why: the kernel calls a socket's write-space callback as each sent
        frame is freed, and on the receiving socket that finds epoll's wait entry and
        takes the wait queue's lock, per frame. Falls back to `rx` if it cannot be opened."""
        try:
            tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError:
            return rx
        try:
            with contextlib.suppress(OSError):
                tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            tx.bind((name, 0))
        except OSError:
            tx.close()
            return rx
        tx.setblocking(False)
        return tx

    @staticmethod
    def _slot_size(mtu: int) -> int:
        frame_size = 2048
        while frame_size < mtu + 18 + 128:  # VLAN-tagged frame + the ring's frame header
            frame_size <<= 1
        return frame_size

    def fits(self, mtu: int) -> bool:
        """Whether frames of this MTU fit the receive ring's slots (a bigger frame would be
        cut by the kernel and dropped: the device must be opened again)."""
        return self._ring is None or self._slot_size(mtu) <= self._frame_size

    def set_mtu(self, mtu: int) -> str | None:
        """Set the device's MTU; None, or why the kernel refused."""
        try:
            _set_mtu(self.name, mtu)
        except OSError as e:
            return e.strerror or str(e)
        return None

    def mtu(self) -> int | None:
        return device_mtu(self.name)

    def _setup_ring(self, name: str) -> None:
        """A TPACKET_V2 receive ring: the kernel copies frames into shared memory, and we
        take them without a system call per frame."""
        mtu = int(_read_sys(name, "mtu") or 1500)
        frame_size = self._slot_size(mtu)
        block_size = max(frame_size, RING_BLOCK)
        block_nr = max(RING_BYTES // block_size, 1)
        frame_nr = block_nr * (block_size // frame_size)
        self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        self.sock.setsockopt(
            SOL_PACKET,
            PACKET_RX_RING,
            struct.pack("IIII", block_size, block_nr, frame_size, frame_nr),
        )
        self._ring = mmap.mmap(
            self.sock.fileno(),
            block_size * block_nr,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._frame_size = frame_size
        self._frame_nr = frame_nr
        self.ring_head = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def link_state(self) -> str:
        return "up" if _read_sys(self.name, "carrier") == "1" else "down"

    def recv_batch(self, limit: int = 32) -> list[bytes]:
        """Up to `limit` frames, with the VLAN tag the kernel moved to metadata put back."""
        ring = self._ring
        if ring is None:
            return self._recv_batch_syscalls(limit)
        out, self.ring_head = _ring_read(ring, self.ring_head, self._frame_size,
                                         self._frame_nr, limit)
        if not out:
            # Nothing is read through the socket any more, so a pending error (ENETDOWN
            # when the link flaps) would stay and keep epoll waking us: consume it.
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return out

    @property
    def has_ring(self) -> bool:
        """Whether frames arrive through a mapped receive ring (PACKET_RX_RING)."""
        return self._ring is not None

    def ring_layout(self) -> tuple[mmap.mmap, int, int] | None:
        """(ring, slot size, slot count) of the receive ring, for a reader in C that takes
        from slot `ring_head` and moves it on, as `recv_ring` does; None without it."""
        if self._ring is None:
            return None
        return self._ring, self._frame_size, self._frame_nr

    def recv_ring(self, limit: int = 32) -> Sequence[bytes] | None:
        """Up to `limit` frames left where the kernel wrote them (a `RingBatch`: read in
        place, copied only where needed; the caller releases it), or None without the
        ring or the compiled module."""
        ring = self._ring
        if ring is None or _ring_take is None:
            return None
        batch = _ring_take(ring, self.ring_head, self._frame_size, self._frame_nr, limit)
        self.ring_head = batch.head
        if not len(batch):
            batch.release()
            # As recv_batch: a pending error would keep epoll waking us.
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return batch

    def _recv_batch_syscalls(self, limit: int) -> list[bytes]:
        out = []
        recvmsg_into, bufs, mv = self.sock.recvmsg_into, self._bufs, self._mv
        for _ in range(limit):
            try:
                n, anc, _flags, _addr = recvmsg_into(bufs, AUX_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            frame = mv[:n].tobytes()
            for level, type_, data in anc:
                if level == SOL_PACKET and type_ == PACKET_AUXDATA and len(data) >= 20:
                    status, tci, tpid = _AUX_VLAN.unpack_from(data)
                    if status & TP_STATUS_VLAN_VALID and n >= 12:
                        if not status & TP_STATUS_VLAN_TPID_VALID or not tpid:
                            tpid = 0x8100
                        frame = frame[:12] + _VLAN_TAG.pack(tpid, tci) + frame[12:]
            out.append(frame)
        return out

    def fast_output(self) -> tuple[int, int] | None:
        """How the compiled pipelines send on this device themselves, exactly as `send`
        (RxTable.set_outputs); None without the compiled module."""
        if _send_frames is None:
            return None
        return fast._fastpath.OUTPUT_PACKET, self.tx_sock.fileno()

    def send(self, frames: list[bytes]) -> SendResult:
        if _send_frames is not None:
            return _send_frames(self.tx_sock.fileno(), frames)
        return _send_all(self.tx_sock.send, frames)

    def close(self) -> None:
        if self._ring is not None:
            # A RingBatch still alive (an exception on its way) holds the map: it is
            # unmapped when the batch goes.
            with contextlib.suppress(BufferError):
                self._ring.close()
            self._ring = None
        if self.tx_sock is not self.sock:
            self.tx_sock.close()
        self.sock.close()


class LinuxDevices:
    """Opens real devices; the datapath's default I/O provider.

    With a `state_path`, it remembers which named network namespace each persistent TAP
    device was moved into (a VM's), so that after a crash the restarted daemon attaches
    to the device where it is instead of creating a new one.
    """

    def __init__(self, state_path: str | None = None) -> None:
        self.state_path = state_path
        self.homes: dict[str, str] = {}
        self._own_ns = os.stat("/proc/self/ns/net").st_ino
        if state_path:
            try:
                with open(state_path) as f:
                    data = json.load(f)
                self.homes = {str(k): str(v) for k, v in data.items()}
            except (OSError, ValueError, AttributeError):
                self.homes = {}

    def open_tap(self, name: str, persist: bool = False, offload: bool = False) -> TapDevice:
        home = self.homes.get(name)
        if persist and home and not os.path.exists(f"/sys/class/net/{name}"):
            try:
                return TapDevice(name, persist, fd=_attach_tun_in(home, name, persist),
                                 offload=offload)
            except OSError:
                pass  # gone with its namespace: create a new one here
        return TapDevice(name, persist, offload=offload)

    def track_tap(self, dev: TapDevice, now: float) -> None:
        """Note (every few seconds) which namespace a TAP device was moved into."""
        if now < dev.next_track or self.state_path is None:
            return
        dev.next_track = now + TRACK_INTERVAL
        ino = dev.netns_inode()
        home = None
        if ino is not None and ino != self._own_ns:
            home = self._netns_path(ino)
        if self.homes.get(dev.name) != home:
            if home is None:
                self.homes.pop(dev.name, None)
            else:
                self.homes[dev.name] = home
            self._save()

    def forget_tap(self, name: str) -> None:
        if self.homes.pop(name, None) is not None:
            self._save()

    @staticmethod
    def _netns_path(ino: int) -> str | None:
        try:
            names = os.listdir(NETNS_DIR)
        except OSError:
            return None
        for n in names:
            path = os.path.join(NETNS_DIR, n)
            try:
                if os.stat(path).st_ino == ino:
                    return path
            except OSError:
                continue
        return None

    def _save(self) -> None:
        tmp = f"{self.state_path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.homes, f)
            os.replace(tmp, self.state_path)
        except OSError:
            pass

    def open_system(self, name: str) -> PacketSocketDevice:
        return PacketSocketDevice(name)

    @staticmethod
    def ifindex(name: str) -> int | None:
        """The index of the device `name` in this namespace, None if there is none."""
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return None


class MemoryDevice:
    """A device in memory: `inject()` frames to receive, read `sent` for what went out.

    With `wire` (OUTPUT_TAP or OUTPUT_PACKET of the compiled module), what goes out is
    written to one end of a datagram socket pair exactly as the real TAP or packet socket
    device writes it (GRO runs with their virtio-net headers, or one datagram a frame),
    from Python (`send`) or by the compiled pipelines themselves (`fast_output`); `take()`
    then returns the datagrams as they arrived at the other end.
    """

    def __init__(self, name: str, mac: bytes, wire: int | None = None) -> None:
        self.name = name
        self.mac = mac
        self.inbox: list[bytes] = []
        self.sent: list[bytes] = []
        self.closed = False
        self.wire = wire
        #: calls of `send` (with `wire`: what Python wrote, not the compiled pipelines)
        self.send_calls = 0
        self._pair: tuple[socket.socket, socket.socket] | None = None
        if wire is not None:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            # A socket pair has no queue length limit, only its buffer: large enough
            # that a test's batches never meet it.
            a.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
            b.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            b.setblocking(False)
            self._pair = (a, b)

    def fileno(self) -> int:
        return -1

    def link_state(self) -> str:
        return "up"

    def set_mtu(self, mtu: int) -> str | None:
        """As a Linux device: an Ethernet device takes 68 to 65535."""
        if not 68 <= mtu <= 65535:
            return "Invalid argument"
        self._mtu = mtu
        return None

    def mtu(self) -> int | None:
        return getattr(self, "_mtu", 1500)

    def fits(self, mtu: int) -> bool:
        return True

    def recv_batch(self, limit: int = 32) -> list[bytes]:
        out, self.inbox = self.inbox[:limit], self.inbox[limit:]
        return out

    def fast_output(self) -> tuple[int, int] | None:
        if self._pair is None:  # (a pair exists with `wire` only)
            return None
        return self.wire, self._pair[0].fileno()

    def send(self, frames: list[bytes]) -> SendResult:
        self.send_calls += 1
        if self._pair is not None:
            fd = self._pair[0].fileno()
            if self.wire == fast._fastpath.OUTPUT_TAP:
                return _tap_send(fd, frames)
            return _send_frames(fd, frames)
        self.sent.extend(frames)
        return len(frames), [], []

    def take(self) -> list[bytes]:
        if self._pair is not None:
            out = []
            while True:
                try:
                    out.append(self._pair[1].recv(1 << 17))
                except BlockingIOError:
                    return out
        out, self.sent = self.sent, []
        return out

    def close(self) -> None:
        self.closed = True
        if self._pair is not None:
            for sock in self._pair:
                sock.close()
            self._pair = None


class MemoryDevices:
    """Device provider for tests: every TAP or system device lives in memory.

    `system_names` lists the system devices that "exist"; others fail like the kernel's.
    """

    def __init__(self, system_names: tuple[str, ...] = (), mac_prefix: int = 0,
                 wire: bool = False) -> None:
        self.system_names = set(system_names)
        #: devices write to socket pairs as the real ones do (MemoryDevice's `wire`)
        self.wire = wire
        self.devices: dict[str, MemoryDevice] = {}
        self._next_mac = 1
        self._prefix = mac_prefix
        # bump a name's generation to simulate a device deleted and created again
        self.generation: dict[str, int] = {}

    def _new(self, name: str, wire: int | None = None) -> MemoryDevice:
        mac = bytes([0x02, 0, 0, 0, self._prefix & 0xFF, self._next_mac])
        self._next_mac += 1
        dev = MemoryDevice(name, mac, wire if self.wire else None)
        self.devices[name] = dev
        return dev

    def open_tap(self, name: str, persist: bool = False, offload: bool = False
                 ) -> MemoryDevice:
        check_ifname(name)
        return self._new(name, fast._fastpath.OUTPUT_TAP if self.wire else None)

    def track_tap(self, dev: MemoryDevice, now: float) -> None:
        pass

    def forget_tap(self, name: str) -> None:
        pass

    def open_system(self, name: str) -> MemoryDevice:
        check_ifname(name)
        if name not in self.system_names:
            raise PortError(f"system device '{name}' does not exist")
        dev = self._new(name, fast._fastpath.OUTPUT_PACKET if self.wire else None)
        dev.ifindex = self.ifindex(name)
        return dev

    def ifindex(self, name: str) -> int | None:
        """Stable per name while the name is in `system_names`; remove it to "unplug"."""
        if name not in self.system_names:
            return None
        return self.generation.get(name, 0) * 1000 + sorted(self.system_names).index(name) + 1
