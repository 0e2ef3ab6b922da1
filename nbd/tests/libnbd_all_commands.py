"""Drives every command and flag of aiocoro-nbd through libnbd, checking data and status.

Usage: libnbd_all_commands.py URL on|off   (structured replies requested or not)
The export must be writable, at least 4 MiB, and read as zeroes at first.
Exits non-zero (an AssertionError or an nbd.Error) on the first surprise.
"""

import errno
import sys

import nbd

MIB = 1 << 20
BASE = "base:allocation"
DEPTH = "qemu:allocation-depth"

url, structured = sys.argv[1], sys.argv[2] == "on"


def connect():
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context(BASE)
    h.add_meta_context(DEPTH)
    h.connect_uri(url)
    return h


def expect_error(code, call, *args):
    try:
        call(*args)
    except nbd.Error as error:
        assert error.errnum == code, f"{call.__name__}{args}: {error} (wanted errno {code})"
        return
    raise AssertionError(f"{call.__name__}{args} succeeded; wanted errno {code}")


def status(h, offset, count, flags=0):
    """{context: [(length, flags), ...]} for the range."""
    seen = {}

    def extent(context, at, entries, error):
        assert at == offset, f"extents of {context} start at {at}, not {offset}"
        seen[context] = list(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(count, offset, extent, flags)
    return seen


h = connect()
size = h.get_size()
assert size >= 4 * MIB, size
assert h.get_structured_replies_negotiated() == structured
for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
            "can_multi_conn"):
    assert getattr(h, can)(), f"{can} is false"
assert not h.is_read_only()
assert h.can_df() == structured, "DF is advertised exactly with structured replies"
assert h.can_meta_context(BASE) == structured
assert h.can_meta_context(DEPTH) == structured

# WRITE, with and without FUA; READ back.
h.pwrite(b"\x5a" * 65536, 0)
h.pwrite(b"\xa5" * 4096, 65536, nbd.CMD_FLAG_FUA)
assert h.pread(65536 + 4096, 0) == b"\x5a" * 65536 + b"\xa5" * 4096
# WRITE_ZEROES: punching (default) and NO_HOLE, with FUA; TRIM with FUA; FLUSH; CACHE.
h.pwrite(b"\x77" * (2 * MIB), MIB)
h.zero(MIB // 2, MIB)
h.zero(4096, 2 * MIB + 8192, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.trim(MIB // 4, 2 * MIB + MIB // 2, nbd.CMD_FLAG_FUA)
h.flush()
h.cache(MIB, 0)
# FAST_ZERO: whole clusters are fast; a partial one would be written, so ENOTSUP and
# nothing changes.
h.pwrite(b"\x31" * 131072, 3 * MIB)
h.zero(65536, 3 * MIB, nbd.CMD_FLAG_FAST_ZERO)
expect_error(errno.ENOTSUP, h.zero, 4096, 3 * MIB + 65536 + 512, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(131072, 3 * MIB) == bytes(65536) + b"\x31" * 65536, "fast zero"
expected = bytearray(b"\x77" * (2 * MIB))
expected[0 : MIB // 2] = bytes(MIB // 2)
expected[MIB + 8192 : MIB + 12288] = bytes(4096)
got = h.pread(2 * MIB, MIB)
# The trimmed range may read as anything; everything else is exact.
trim = slice(MIB + MIB // 2, MIB + MIB // 2 + MIB // 4)
assert got[: trim.start] == expected[: trim.start], "data before the trimmed range"
assert got[trim.stop :] == expected[trim.stop :], "data after the trimmed range"

# READ in structured chunks: the zeroed range comes as a hole, the data as data.
if structured:
    chunks = []

    def chunk(buf, offset, state, error):
        chunks.append((offset, len(buf), state))
        return 0

    at = MIB + MIB // 4
    data = h.pread_structured(MIB, at, chunk)
    assert data == bytes(MIB // 4) + bytes(got[MIB // 2 : MIB // 2 + MIB * 3 // 4])
    assert chunks == [(at, MIB // 4, nbd.READ_HOLE), (at + MIB // 4, MIB * 3 // 4, nbd.READ_DATA)], chunks
    chunks.clear()
    assert h.pread_structured(MIB, at, chunk, nbd.CMD_FLAG_DF) == data
    assert chunks == [(at, MIB, nbd.READ_DATA)], f"DF: {chunks}"

    # BLOCK_STATUS in both contexts, with and without REQ_ONE.
    seen = status(h, MIB, 2 * MIB)
    assert seen[BASE][0] == (MIB // 2, nbd.STATE_HOLE | nbd.STATE_ZERO), seen
    # Data follows for at least 1 MiB (the trimmed range after it may or may not be freed:
    # a server may ignore TRIM).
    assert seen[BASE][1][0] >= MIB and seen[BASE][1][1] == 0, seen
    # The zeroed clusters: freed (depth 0) or zero clusters (depth 1), as the image format
    # does it; the data after them is the image's own (depth 1).
    assert seen[DEPTH][0][0] == MIB // 2 and seen[DEPTH][0][1] in (0, 1), seen
    assert seen[DEPTH][1][0] >= MIB and seen[DEPTH][1][1] == 1, seen
    for context in (BASE, DEPTH):
        assert sum(length for length, _ in seen[context]) == 2 * MIB, seen
    one = status(h, MIB, 2 * MIB, nbd.CMD_FLAG_REQ_ONE)
    assert one == {BASE: [seen[BASE][0]], DEPTH: [seen[DEPTH][0]]}, one
    # Never written: unallocated (depth 0), a hole that reads as zeroes.
    tail = status(h, size - MIB, MIB)
    assert tail == {BASE: [(MIB, 3)], DEPTH: [(MIB, 0)]}, tail

# Errors the server answers (libnbd's own checks off, so the requests go out).
h.set_strict_mode(0)
expect_error(errno.EINVAL, h.pread, 4096, size)
expect_error(errno.EINVAL, h.pwrite, b"x" * 4096, size - 1)
expect_error(errno.EINVAL, h.zero, 4096, size - 2048)
expect_error(errno.EINVAL, h.trim, 4096, size)
expect_error(errno.EINVAL, h.cache, 4096, size)
expect_error(errno.EINVAL, h.flush, nbd.CMD_FLAG_NO_HOLE)
if not structured:
    expect_error(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_DF)
h.shutdown()

# Without any selected context, BLOCK_STATUS is EINVAL (when libnbd lets it be sent).
if structured:
    bare = nbd.NBD()
    bare.connect_uri(url)
    bare.set_strict_mode(0)
    assert not bare.can_meta_context(BASE)
    expect_error(errno.EINVAL, status, bare, 0, 4096)
    bare.shutdown()

# LIST_META_CONTEXT in option mode: both contexts, and only base: for "base:".
lister = nbd.NBD()
lister.set_request_structured_replies(structured)
lister.set_opt_mode(True)
lister.connect_uri(url)
if structured:
    listed = []
    lister.opt_list_meta_context(lambda name: listed.append(name) or 0)
    assert sorted(listed) == [BASE, DEPTH], listed
    listed.clear()
    lister.add_meta_context("base:")
    lister.opt_list_meta_context(lambda name: listed.append(name) or 0)
    assert listed == [BASE], listed
lister.opt_abort()
print("ok", "structured" if structured else "simple")
