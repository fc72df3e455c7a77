"""FUSE over io_uring (kernel 6.14+, ``/sys/module/fuse/parameters/enable_uring``).

With ``/dev/fuse`` read and written by a pool of threads, each request wakes a daemon
thread on whichever CPU it last ran on, and each reply wakes the caller back: on this
project's 2-vCPU VM, whose idle vCPUs halt, those cross-CPU wake-ups are most of the cost
of a small request (benchmarks/README.md, session 14: creating files with the daemon and
the creator pinned to one CPU ran at 5,400-6,100 files/s against 3,150-3,670).

Over io_uring the kernel keeps one queue of requests per CPU: a request goes to the
queue of the CPU its caller runs on, and is handed to the thread that registered that
queue's entries. Here that thread is pinned to the CPU (``Queue``), so a request and its
reply are served where the caller runs. Each entry is a pair of buffers the kernel
writes a request into (a header: ``fuse_in_header`` and the request's fixed-size
argument; a payload: the rest) and the daemon writes the reply into, committed with the
next fetch in one ``IORING_OP_URING_CMD`` (``FUSE_IO_URING_CMD_COMMIT_AND_FETCH``).

Streaming readers are the exception: the kernel sends their readahead READs without
waiting, so the reader keeps its CPU busy, and a thread pinned there would pick the
READs up only when the reader let it run. A READ of ``OFFLOAD_READ_FROM`` bytes or more
is answered by a helper thread (its data is copied into the entry beside the reader),
and the queue's thread may run on any CPU until ``STREAM_HOLD`` after the last such
READ (``Queue.serve``).

FORGET and INTERRUPT still come through ``/dev/fuse``, as do notifications the daemon
sends (``wire._Session`` keeps its readers for them).

No library: Debian bookworm has no liburing binding for Python, and the ring needs
four system calls and three maps (``Ring``), made here with ``ctypes`` and ``mmap``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("layerstore.fuse.uring")

ENABLE_PARAM = "/sys/module/fuse/parameters/enable_uring"
#: x86_64 (and most 64-bit) system call numbers
_NR_SETUP, _NR_ENTER, _NR_REGISTER = 425, 426, 427
REGISTER_ENABLE_RINGS = 12
#: io_uring_setup flags
SETUP_R_DISABLED = 1 << 6
SETUP_SQE128 = 1 << 10
SETUP_SINGLE_ISSUER = 1 << 12
SETUP_DEFER_TASKRUN = 1 << 13
FEAT_SINGLE_MMAP = 1 << 0
ENTER_GETEVENTS = 1
OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
OP_READ, OP_URING_CMD = 22, 46
SQE_SIZE = 128
CQE = struct.Struct("<QiI")  # user_data res flags
#: io_uring_params: 10 u32, then io_sqring_offsets and io_cqring_offsets (8 u32 + u64 each)
PARAMS = struct.Struct("<IIIIIII3I" + "8IQ" + "8IQ")
#: FUSE_OVER_IO_URING, in the INIT flags (flags | flags2 << 32)
OVER_IO_URING = 1 << 41
CMD_REGISTER, CMD_COMMIT_AND_FETCH = 1, 2
#: fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out (32)
HEADER_SIZE = 288
OP_IN_AT = 128
ENT_IN_OUT_AT = 256
ENT_IN_OUT = struct.Struct("<QQII")  # flags commit_id payload_sz padding (+ reserved u64)
IN_HEADER_SIZE = 40
#: entries per queue (requests in the daemon at once, per CPU)
ENTRIES = 4
#: a READ of this many bytes or more is served by a helper thread, not the queue's:
#: its copy (the store's map -> the entry's payload) then runs beside the reader, on the
#: other CPU, instead of taking turns with it on this one (``Queue.serve``)
OFFLOAD_READ_FROM = 128 << 10
FUSE_READ = 15
#: after a large READ the queue's thread may run on any CPU for this long (s); it is
#: pinned again at its next other request after that. Pinned, it could pick up a
#: streaming reader's next READs only when the reader, busy on the same CPU, let it
#: (the kernel sends readahead without waiting): a cold read of 256 MiB over io_uring
#: ran at 1,468-1,796 MB/s pinned, 2,107-2,205 with this (on /dev/fuse 2,228-2,367)
STREAM_HOLD = 0.02
#: user_data of the queue's read of its eventfd (entries are 0 .. ENTRIES - 1)
_WAKE = 1 << 32

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
#: io_uring_enter, once per request: typed once, so a call converts plain ints
_enter = ctypes.CDLL(None, use_errno=True).syscall
_enter.restype = ctypes.c_long
_enter.argtypes = [ctypes.c_long, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                   ctypes.c_void_p, ctypes.c_size_t]
_ZERO_SQE = bytes(SQE_SIZE)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_LEN_OP_UNIQUE = struct.Struct("<IIQ")


def wanted() -> bool:
    """Whether to offer FUSE over io_uring: ``LAYERSTORE_FUSE_URING`` (``auto``, the
    default: when the kernel's fuse module has it enabled; ``0``: never)."""
    choice = os.environ.get("LAYERSTORE_FUSE_URING", "auto")
    if choice == "0":
        return False
    try:
        with open(ENABLE_PARAM) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def possible_cpus() -> int:
    """The kernel's ``num_possible_cpus()``: how many queues a ring must have."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def _address(buf: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _set_thread_name(name: str) -> None:
    """The calling thread's name in ps/top -H (PR_SET_NAME; threads it starts inherit
    it)."""
    _libc.prctl(15, ctypes.c_char_p(name.encode()), 0, 0, 0)


def _unmap(*maps: mmap.mmap) -> None:
    for m in maps:
        try:
            m.close()
        except BufferError:  # a view of it is still held: unmapped when it is dropped
            pass


def cmd_sqe(fd: int, cmd_op: int, user_data: int, iov_addr: int, qid: int) -> bytes:
    """An IORING_OP_URING_CMD SQE of FUSE (``iov_addr``: two iovecs) with
    ``fuse_uring_cmd_req`` (flags 0, commit_id 0, ``qid``) in its command area: the
    commit id goes in at offset 56 (``Ring.put``)."""
    sqe = bytearray(SQE_SIZE)
    struct.pack_into("<BBHiIIQIIQ", sqe, 0, OP_URING_CMD, 0, 0, fd, cmd_op, 0, iov_addr, 2,
                     0, user_data)
    struct.pack_into("<QQH", sqe, 48, 0, 0, qid)
    return bytes(sqe)


class Ring:
    """One io_uring with 128-byte SQEs, submitted to and reaped by one thread only."""

    def __init__(self, entries: int):
        params = bytearray(PARAMS.size)
        # disabled until ``enable`` (in the thread that will submit: the single issuer)
        struct.pack_into("<I", params, 8, SETUP_R_DISABLED | SETUP_SQE128
                         | SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN)
        pbuf = (ctypes.c_char * len(params)).from_buffer(params)
        fd = _syscall(_NR_SETUP, ctypes.c_uint(entries), pbuf)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = int(fd)
        p = PARAMS.unpack(params)
        sq_entries, cq_entries, _flags, _cpu, _idle, features = p[:6]
        sq = p[10:19]  # head tail ring_mask ring_entries flags dropped array resv1 user_addr
        cq = p[19:28]  # head tail ring_mask ring_entries overflow cqes flags resv1 user_addr
        if not features & FEAT_SINGLE_MMAP:
            os.close(self.fd)
            raise OSError(errno.ENOSYS, "io_uring without IORING_FEAT_SINGLE_MMAP")
        size = max(sq[6] + sq_entries * 4, cq[5] + cq_entries * CQE.size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        try:
            self.rings = mmap.mmap(self.fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=OFF_SQ_RING)
            self.sqes = mmap.mmap(self.fd, sq_entries * SQE_SIZE, flags,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=OFF_SQES)
        except OSError:
            os.close(self.fd)
            raise
        self.sq_head, self.sq_tail, self.sq_array = sq[0], sq[1], sq[6]
        self.sq_mask: int = struct.unpack_from("<I", self.rings, sq[2])[0]
        self.sq_entries: int = sq_entries
        self.cq_head, self.cq_tail, self.cqes = cq[0], cq[1], cq[5]
        self.cq_mask: int = struct.unpack_from("<I", self.rings, cq[2])[0]
        self.tail: int = struct.unpack_from("<I", self.rings, self.sq_tail)[0]
        self.pending = 0  #: SQEs written and not submitted yet
        for i in range(sq_entries):  # the SQ array maps each slot to the SQE of its index
            struct.pack_into("<I", self.rings, self.sq_array + 4 * i, i)

    def enable(self) -> None:
        """Start the ring, with the calling thread as its only submitter."""
        if _syscall(_NR_REGISTER, ctypes.c_uint(self.fd), ctypes.c_uint(REGISTER_ENABLE_RINGS),
                    None, ctypes.c_uint(0)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_register: {os.strerror(err)}")

    def _next_sqe(self, user_data: int) -> int:
        """The SQE at the tail, zeroed, with ``user_data``, queued for the next
        ``enter``: its offset in ``sqes``, for the caller to fill in."""
        at = (self.tail & self.sq_mask) * SQE_SIZE
        self.sqes[at:at + SQE_SIZE] = _ZERO_SQE
        struct.pack_into("<Q", self.sqes, at + 32, user_data)
        self.tail = (self.tail + 1) & 0xFFFFFFFF
        self.pending += 1
        return at

    def put(self, sqe: bytes, commit_id: int) -> None:
        """Queue a copy of the SQE ``sqe`` (made by ``cmd_sqe``) with ``commit_id``."""
        at = (self.tail & self.sq_mask) * SQE_SIZE
        self.sqes[at:at + SQE_SIZE] = sqe
        _U64.pack_into(self.sqes, at + 56, commit_id)
        self.tail = (self.tail + 1) & 0xFFFFFFFF
        self.pending += 1

    def prep_read(self, fd: int, user_data: int, addr: int, n: int) -> None:
        """Queue an IORING_OP_READ of ``n`` bytes into ``addr``."""
        at = self._next_sqe(user_data)
        struct.pack_into("<BBHiQQI", self.sqes, at, OP_READ, 0, 0, fd, 0, addr, n)

    def enter(self, wait: int) -> None:
        """Publish the SQEs written, submit them and wait for ``wait`` completions."""
        _U32.pack_into(self.rings, self.sq_tail, self.tail)  # x86: stores in order
        n, self.pending = self.pending, 0
        flags = ENTER_GETEVENTS if wait else 0
        while True:
            got = _enter(_NR_ENTER, self.fd, n, wait, flags, None, 0)
            if got >= 0:
                if got < n:  # the rest stays in the ring: submitted with the next call
                    self.pending = n - got
                return
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            n = 0  # the SQEs went in: only wait again

    def reap(self) -> list[tuple[int, int]]:
        """The completions posted so far, as (user_data, res)."""
        rings = self.rings
        head = _U32.unpack_from(rings, self.cq_head)[0]
        tail = _U32.unpack_from(rings, self.cq_tail)[0]
        out = []
        while head != tail:
            ud, res, _ = CQE.unpack_from(rings, self.cqes + (head & self.cq_mask) * CQE.size)
            out.append((ud, res))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(rings, self.cq_head, head)
        return out

    def close(self) -> None:
        _unmap(self.sqes, self.rings)
        os.close(self.fd)


class _Entry:
    """A ring entry's buffers: the kernel writes a request in, the daemon its reply."""

    def __init__(self, payload_size: int):
        self.header = mmap.mmap(-1, HEADER_SIZE)
        self.payload = mmap.mmap(-1, payload_size)
        self.payload_size = payload_size
        self.hview, self.pview = memoryview(self.header), memoryview(self.payload)
        self.iov = bytearray(32)
        struct.pack_into("<QQQQ", self.iov, 0, _address(self.header), HEADER_SIZE,
                         _address(self.payload), payload_size)
        self.iov_addr = _address(self.iov)
        self.replied = False

    def request(self) -> tuple[bytes, int, int]:
        """The request as ``/dev/fuse`` gives it (``fuse_in_header``, the fixed argument,
        the rest), its unique number and its opcode."""
        hdr = self.hview
        length, op, unique = _LEN_OP_UNIQUE.unpack_from(hdr, 0)
        psize = _U32.unpack_from(hdr, ENT_IN_OUT_AT + 16)[0]  # fuse_uring_ent_in_out.payload_sz
        arg0 = max(0, min(length - IN_HEADER_SIZE - psize, ENT_IN_OUT_AT - OP_IN_AT))
        req = b"".join((_U32.pack(IN_HEADER_SIZE + arg0 + psize), hdr[4:IN_HEADER_SIZE],
                        hdr[OP_IN_AT:OP_IN_AT + arg0], self.pview[:psize]))
        return req, unique, op

    def reply(self, unique: int, error: int, pieces: list[bytes | memoryview]) -> None:
        if self.replied:  # as /dev/fuse refuses a second reply (ENOENT): the first stands
            return
        at = 0
        for piece in pieces:
            n = len(piece)
            if at + n > self.payload_size:
                raise OSError(errno.EOVERFLOW, "reply larger than the ring's payload")
            self.payload[at:at + n] = piece
            at += n
        struct.pack_into("<IiQ", self.header, 0, 16 + at, error, unique)
        struct.pack_into("<I", self.header, ENT_IN_OUT_AT + 16, at)
        self.replied = True

    def close(self) -> None:
        self.hview.release()
        self.pview.release()
        _unmap(self.header, self.payload)


class Queue:
    """The ring and entries of one CPU's queue, served by one thread pinned to it (but
    while a reader streams, see ``STREAM_HOLD``), and two helpers for large READs."""

    def __init__(self, qid: int, payload_size: int, entries: int = ENTRIES):
        self.qid = qid
        self.ring = Ring(2 * entries + 2)
        try:
            self.entries = [_Entry(payload_size) for _ in range(entries)]
            self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            self.ring.close()
            raise
        #: large READs are answered in these threads (``OFFLOAD_READ_FROM``), which
        #: put the entry in ``done`` and wake the queue's thread through ``wake``
        self.helpers: ThreadPoolExecutor | None = None
        self.done: deque[tuple[int, int]] = deque()
        self.wake_buf = bytearray(8)
        #: entries whose requests are with the helpers (not answered yet)
        self.in_helpers = 0
        #: (command, entry) -> its SQE (``cmd_sqe``), made at its first use
        self.sqes: dict[tuple[int, int], bytes] = {}

    def _cmd(self, dev_fd: int, op: int, i: int, commit_id: int = 0) -> None:
        """Queue REGISTER or COMMIT_AND_FETCH of entry ``i`` (from its SQE, made once)."""
        sqe = self.sqes.get((op, i))
        if sqe is None:
            sqe = self.sqes[op, i] = cmd_sqe(dev_fd, op, i, self.entries[i].iov_addr, self.qid)
        self.ring.put(sqe, commit_id)

    def serve(self, dev_fd: int, dispatch: Callable[[_Entry, bytes, int], None],
              stopped: Callable[[], bool],
              may_wait: Callable[[int, bytes], bool] | None = None) -> bool:
        """Register the entries, then answer what they bring until the connection ends
        (``dispatch(entry, request, unique)`` replies with ``entry.reply``). False if
        the queue stopped on an error while the connection lives on. A request for
        which ``may_wait(opcode, request)`` is true is answered by a helper thread: it
        may wait for other requests of this queue (a RELEASE), which this thread must
        go on answering meanwhile."""
        allowed = os.sched_getaffinity(0)
        can_pin = pinned = self._pin({self.qid})  # not in a cpuset without this CPU
        streaming_until = 0.0
        _set_thread_name(f"fuse-uring-{self.qid}")
        ring = self.ring
        try:
            ring.enable()
        except OSError as exc:
            log.error("io_uring queue %d: %s", self.qid, exc)
            return False
        for i, e in enumerate(self.entries):
            self._cmd(dev_fd, CMD_REGISTER, i)
        wake_addr = _address(self.wake_buf)
        ring.prep_read(self.wake, _WAKE, wake_addr, 8)
        first = True
        while not stopped():
            try:
                ring.enter(1)
            except OSError as exc:
                log.error("io_uring queue %d: %s", self.qid, exc)
                return False
            for ud, res in ring.reap():
                if ud == _WAKE:  # helpers answered: commit their entries
                    while self.done:
                        i, unique = self.done.popleft()
                        self.in_helpers -= 1
                        self._cmd(dev_fd, CMD_COMMIT_AND_FETCH, i, unique)
                    ring.prep_read(self.wake, _WAKE, wake_addr, 8)
                    continue
                e = self.entries[ud]
                if res < 0:
                    if res == -errno.EAGAIN:  # INIT not answered yet: register again
                        self._cmd(dev_fd, CMD_REGISTER, ud)
                        continue
                    if res in (-errno.ENOTCONN, -errno.ECANCELED, -errno.ECONNABORTED):
                        return True  # unmounted
                    if first:
                        # the kernel refused the registration: it then turns io_uring
                        # off for the connection, and requests come through /dev/fuse
                        log.warning("io_uring queue %d refused (%s): serving /dev/fuse",
                                    self.qid, os.strerror(-res))
                        return True
                    log.error("io_uring queue %d: %s", self.qid, os.strerror(-res))
                    return False
                if first:
                    log.debug("io_uring queue %d: first request", self.qid)
                    first = False
                req, unique, op = e.request()
                if (op == FUSE_READ
                        and _U32.unpack_from(req, IN_HEADER_SIZE + 16)[0] >= OFFLOAD_READ_FROM):
                    # a streaming reader keeps its CPU busy: unpinned, this thread is
                    # woken on the other CPU for its next READs instead of waiting for
                    # the reader to sleep (``STREAM_HOLD``)
                    streaming_until = time.monotonic() + STREAM_HOLD
                    if pinned:
                        pinned = not self._pin(allowed)
                        log.debug("io_uring queue %d: unpinned for a streaming reader",
                                  self.qid)
                    if self.helpers is None:
                        log.debug("io_uring queue %d: first large READ, to a helper", self.qid)
                    self._offload(ud, e, req, unique, dispatch, allowed)
                    continue
                if (may_wait is not None and self.in_helpers < len(self.entries) - 1
                        and may_wait(op, req)):
                    # (while one entry stays free for what it waits for, a RELEASE;
                    # else answered here, without waiting)
                    self._offload(ud, e, req, unique, dispatch, allowed)
                    continue
                if can_pin and not pinned and time.monotonic() > streaming_until:
                    pinned = self._pin({self.qid})
                    log.debug("io_uring queue %d: pinned again", self.qid)
                self._answer(e, req, unique, dispatch)
                self._cmd(dev_fd, CMD_COMMIT_AND_FETCH, ud, unique)
        with contextlib.suppress(OSError):
            ring.enter(0)  # the replies of the last round (stopped meanwhile)
        return True

    def _offload(self, ud: int, e: _Entry, req: bytes, unique: int,
                 dispatch: Callable[[_Entry, bytes, int], None], cpus: set[int]) -> None:
        """Have a helper thread answer entry ``ud``'s request (``_answer_elsewhere``)."""
        if self.helpers is None:
            self.helpers = ThreadPoolExecutor(2, f"fuse-uring-{self.qid}-help",
                                              self._helper_start, (cpus,))
        self.in_helpers += 1
        self.helpers.submit(self._answer_elsewhere, ud, e, req, unique, dispatch)

    def _helper_start(self, cpus: set[int]) -> None:
        """A helper (large READs, requests that may wait): its own name (not its
        creator's), on any CPU."""
        _set_thread_name(f"fuse-uring-{self.qid}r")
        self._pin(cpus)

    def _pin(self, cpus: set[int]) -> bool:
        """Let this thread run on ``cpus`` only; False if it may not (a cpuset)."""
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            return False
        return True

    def _answer(self, e: _Entry, req: bytes, unique: int,
                dispatch: Callable[[_Entry, bytes, int], None]) -> None:
        e.replied = False
        try:
            dispatch(e, req, unique)
        except Exception:  # a request must be answered, or its caller hangs
            log.exception("io_uring queue %d: request %d", self.qid, unique)
        if not e.replied:
            e.reply(unique, -errno.EIO, [])

    def _answer_elsewhere(self, ud: int, e: _Entry, req: bytes, unique: int,
                          dispatch: Callable[[_Entry, bytes, int], None]) -> None:
        self._answer(e, req, unique, dispatch)
        self.done.append((ud, unique))
        os.eventfd_write(self.wake, 1)

    def close(self) -> None:
        if self.helpers is not None:
            self.helpers.shutdown()
        self.ring.close()
        os.close(self.wake)
        for e in self.entries:
            e.close()
