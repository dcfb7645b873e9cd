"""SSDAQ's streamed object files (SOF, protocol 1): a sans-IO writer (objects in, bytes out) and a
reader that checks every offset, length and CRC.

Layout (all little-endian):
- File header `<4s4sIQ2H` (24 bytes): b"SOF\\0", a 4-byte marker extension (zeros), u32 protocol
  version 1, u64 creation time (unix seconds), u16 compressor (0 none, 1 bz2), u16 length of the
  header extension that follows.
- The CHEC header extension `<2HB` + text: u16 file version 1, u16 data type (1 LogData,
  2 TriggerMessage, 3 trigger packet, 4 Frame), u8 n, then n bytes naming the writing software.
- Bunches, each: the objects concatenated (as one bz2 stream if compressed), an index of n u32
  CRC32s then n u32 lengths (of the uncompressed objects), and a 34-byte trailer `<3Q2IH`: offset
  from the previous trailer's start to this one (from the file's start for the first), size of
  data + index, this trailer's own file offset, a CRC (always 0), n, and the bunch number (u16).
- A bunch is closed once more than `bunch_bytes` (1,000,000) uncompressed bytes are buffered, and
  at the end. Readers (SSDAQ's too) walk the trailers backwards from the end of the file.
"""

from __future__ import annotations

import bz2
import struct
import zlib
from dataclasses import dataclass, field

from daqd import __version__
from daqd.errors import DaqdError

MAGIC = b"SOF\x00"
PROTOCOL = 1
FILE_HEADER = struct.Struct("<4s4sIQ2H")
TRAILER = struct.Struct("<3Q2IH")
CHEC_HEADER = struct.Struct("<2HB")
CHEC_FILE_VERSION = 1
NONE, BZ2 = 0, 1
BUNCH_BYTES = 1_000_000
MAX_BUNCHES = 1 << 16  # the bunch number is a u16: SSDAQ's reader keys bunches by it
MAX_OBJECT = (1 << 32) - 1

# the data types of the CHEC header extension
LOG, TIMESTAMP, TRIGGER, FRAME = 1, 2, 3, 4
DATA_TYPE_NAMES = {
    LOG: "LogData",
    TIMESTAMP: "TriggerMessage",
    TRIGGER: "trigger packet",
    FRAME: "Frame",
}


class SofError(DaqdError):
    """Bytes that are not a whole SOF protocol 1 file, or an object a SOF file cannot hold."""


def chec_header(data_type: int, software: str) -> bytes:
    """The CHEC header extension: file version 1, the data type, the writing software's name."""
    text = software.encode()[:255]
    return CHEC_HEADER.pack(CHEC_FILE_VERSION, data_type, len(text)) + text


class SofWriter:
    """Objects in, file bytes out: `add(obj)` and `close()` return the bytes to append to the
    file (the header comes with the first call; a bunch once it is full). `pos` is the number of
    bytes returned so far."""

    def __init__(
        self,
        data_type: int,
        created_s: int,
        *,
        compress: bool = True,
        complevel: int = 9,
        bunch_bytes: int = BUNCH_BYTES,
        software: str = f"daqd {__version__}",
    ) -> None:
        ext = chec_header(data_type, software)
        compressor = BZ2 if compress else NONE
        self._out = [FILE_HEADER.pack(MAGIC, b"", PROTOCOL, created_s, compressor, len(ext)), ext]
        self.compress = compress
        self.complevel = complevel
        self.bunch_bytes = bunch_bytes
        self.pos = 0
        self.objects = 0
        self.bunches = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._last_trailer = 0  # start of the previous trailer; 0 before the first

    def add(self, obj: bytes) -> bytes:
        if len(obj) > MAX_OBJECT:
            raise SofError(f"an object of {len(obj)} bytes: SOF lengths are u32")
        self._buffer.append(obj)
        self._buffered += len(obj)
        self.objects += 1
        if self._buffered > self.bunch_bytes:
            self._bunch()
        return self._take()

    def close(self) -> bytes:
        """The rest of the file: the last bunch (and the header if nothing was added)."""
        if self._buffer:
            self._bunch()
        return self._take()

    def _take(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        self.pos += len(out)
        return out

    def _bunch(self) -> None:
        if self.bunches >= MAX_BUNCHES:
            raise SofError(f"more than {MAX_BUNCHES} bunches: SOF numbers them in a u16")
        objs = self._buffer
        raw = b"".join(objs)
        data = bz2.compress(raw, self.complevel) if self.compress else raw
        n = len(objs)
        index = struct.pack(f"<{2 * n}I", *(zlib.crc32(o) for o in objs), *map(len, objs))
        start = self.pos + sum(map(len, self._out))  # where this bunch's data begins
        trailer_at = start + len(data) + len(index)
        trailer = TRAILER.pack(
            trailer_at - self._last_trailer,
            len(data) + len(index),
            trailer_at,
            0,
            n,
            self.bunches,
        )
        self._out += (data, index, trailer)
        self._last_trailer = trailer_at
        self.bunches += 1
        self._buffer = []
        self._buffered = 0


@dataclass(frozen=True)
class Bunch:
    """One bunch's trailer, as read."""

    offset: int  # where the bunch's data begins
    prev_offset: int  # the trailer's first field
    data_index_bytes: int
    trailer_at: int
    crc: int
    count: int
    number: int
    data_bytes: int  # stored (compressed) size of the objects


@dataclass
class SofFile:
    """What `read_sof` found: the header fields, the CHEC extension, each bunch and object."""

    marker_ext: bytes
    version: int
    created_s: int
    compressor: int
    header_ext: bytes
    data_type: int | None = None  # from the CHEC extension, if it has one
    chec_file_version: int | None = None
    software: str | None = None
    bunches: list[Bunch] = field(default_factory=list)
    objects: list[bytes] = field(default_factory=list)


def read_sof(data: bytes | memoryview) -> SofFile:
    """Parse a whole SOF protocol 1 file. Raises SofError naming the first thing that is wrong:
    every trailer's offsets, every CRC32 and length, and the bunch numbers are checked."""
    buf = memoryview(data)
    size = len(buf)
    if size < FILE_HEADER.size:
        raise SofError(f"{size} bytes: shorter than the {FILE_HEADER.size}-byte SOF header")
    magic, marker_ext, version, created, compressor, ext_len = FILE_HEADER.unpack_from(buf)
    if magic[:3] != b"SOF":
        raise SofError(f"not a SOF file (it begins {bytes(magic)!r})")
    if version != PROTOCOL:
        raise SofError(f"SOF protocol {version}; this reader reads protocol {PROTOCOL}")
    if compressor not in (NONE, BZ2):
        raise SofError(f"unknown compressor {compressor}")
    first = FILE_HEADER.size + ext_len
    if first > size:
        raise SofError(f"the header extension ({ext_len} bytes) runs past the end ({size})")
    out = SofFile(marker_ext, version, created, compressor, bytes(buf[FILE_HEADER.size : first]))
    if ext_len >= CHEC_HEADER.size:
        file_version, data_type, n = CHEC_HEADER.unpack_from(out.header_ext)
        if CHEC_HEADER.size + n == ext_len:
            out.chec_file_version, out.data_type = file_version, data_type
            out.software = out.header_ext[CHEC_HEADER.size :].decode("utf-8", "replace")
    bunches = _trailers(buf, first)
    for expect, b in enumerate(bunches):
        if b.number != expect:
            raise SofError(f"bunch {expect} (trailer at {b.trailer_at}) is numbered {b.number}")
        out.bunches.append(b)
        out.objects += _objects(buf, b, compressor)
    return out


def _trailers(buf: memoryview, first: int) -> list[Bunch]:
    """The bunches from the first to the last, found by walking the trailers backwards."""
    found: list[Bunch] = []
    at = len(buf) - TRAILER.size
    if len(buf) == first:
        return found
    while True:
        if at < first:
            raise SofError(f"{len(buf) - first} bytes after the header hold no whole bunch")
        prev, dib, fileoff, crc, n, number = TRAILER.unpack_from(buf, at)
        if fileoff != at:
            raise SofError(f"the trailer at byte {at} says it is at byte {fileoff}")
        if dib < 8 * n or dib > at - first:
            raise SofError(f"the trailer at byte {at}: data + index of {dib} bytes for {n} objects")
        start = at - dib
        found.append(Bunch(start, prev, dib, at, crc, n, number, dib - 8 * n))
        if start == first:  # the first bunch: its offset is counted from the file's start
            if prev != at:
                raise SofError(f"the first bunch's trailer (byte {at}) has offset {prev}, not {at}")
            break
        if at - prev + TRAILER.size != start:  # bunches follow each other with no gap
            raise SofError(
                f"the trailer at byte {at} points back to byte {at - prev}, but its bunch "
                f"begins at byte {start}"
            )
        at -= prev
    found.reverse()
    return found


def _objects(buf: memoryview, b: Bunch, compressor: int) -> list[bytes]:
    n = b.count
    index = struct.unpack_from(f"<{2 * n}I", buf, b.offset + b.data_bytes)
    crcs, lengths = index[:n], index[n:]
    stored = bytes(buf[b.offset : b.offset + b.data_bytes])
    if compressor == BZ2:
        try:
            raw = bz2.decompress(stored)
        except (OSError, ValueError, EOFError) as exc:
            raise SofError(f"bunch {b.number}: bz2 data does not decompress ({exc})") from None
    else:
        raw = stored
    if sum(lengths) != len(raw):
        raise SofError(
            f"bunch {b.number}: the index says {sum(lengths)} bytes, data has {len(raw)}"
        )
    objs: list[bytes] = []
    pos = 0
    for k, (crc, length) in enumerate(zip(crcs, lengths, strict=True)):
        obj = raw[pos : pos + length]
        if zlib.crc32(obj) != crc:
            raise SofError(f"bunch {b.number}, object {k}: CRC32 mismatch")
        objs.append(obj)
        pos += length
    return objs
