"""The TFRecord format, framing and reading with every CRC checked: numpy-free,
TensorFlow-free (the reader in pipeline.reader uses it, and so do stage 1,
verification and inspect).

    record = uint64 length, uint32 masked crc32c(length), data, uint32 masked crc32c(data)

A GZIP TFRecord file is such records gzip-compressed, in one or more gzip
members (this project's files are many members: see transforms.encode).
"""
from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Iterable, Iterator, Optional

import google_crc32c


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_records(records: Iterable[bytes]) -> bytes:
    """TFRecord framing: len, masked crc(len), data, masked crc(data). The
    length header and its CRC are made once per distinct length (a case's
    examples differ in length only by their window_start's varint)."""
    heads: dict[int, bytes] = {}
    parts = []
    pack_crc = struct.Struct("<I").pack
    for rec in records:
        n = len(rec)
        head = heads.get(n)
        if head is None:
            length = struct.pack("<Q", n)
            head = heads[n] = length + pack_crc(_masked_crc(length))
        parts += (head, rec, pack_crc(_masked_crc(rec)))
    return b"".join(parts)



class CorruptRecordError(IOError):
    pass


# ---- protobuf wire format: what encode writes and the reader's fast path expects ----

def varint(v: int) -> bytes:
    """A varint as protobuf writes it (an int64 in two's complement)."""
    v &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def length_delimited(tag: int, length: int) -> bytes:
    """The tag byte and length varint of a length-delimited protobuf field."""
    return bytes([tag]) + varint(length)


class _Stream:
    """The bytes of a (gzip) stream as they are needed: `need(k)` reads and
    inflates until k bytes lie past `pos` (one or more gzip members)."""

    def __init__(self, fileobj: BinaryIO, gzipped: bool, chunk: int):
        self.fileobj, self.chunk = fileobj, chunk
        self.z = zlib.decompressobj(31) if gzipped else None
        self.buf = bytearray()
        self.pos = 0
        self.eof = False

    def _inflate(self, raw: bytes) -> None:
        try:
            self.buf.extend(self.z.decompress(raw))
            while self.z.eof and self.z.unused_data:  # the next gzip member follows
                rest = self.z.unused_data
                self.z = zlib.decompressobj(31)
                self.buf.extend(self.z.decompress(rest))
        except zlib.error as e:  # a damaged byte: bad deflate data, header or gzip CRC
            raise CorruptRecordError(f"damaged gzip stream ({e})") from None

    def _finish(self) -> None:
        self.eof = True
        if self.z is None:
            return
        try:
            self.buf.extend(self.z.flush())
        except zlib.error as e:
            raise CorruptRecordError(f"damaged gzip stream ({e})") from None
        if not self.z.eof:
            raise CorruptRecordError("gzip stream ended early (truncated file)")

    def need(self, k: int) -> bool:
        while not self.eof and len(self.buf) - self.pos < k:
            raw = self.fileobj.read(self.chunk)
            if not raw:
                self._finish()
            elif self.z is not None:
                self._inflate(raw)
            else:
                self.buf.extend(raw)
        return len(self.buf) - self.pos >= k

    def advance(self, n: int) -> None:
        self.pos += n
        if self.pos > (1 << 22):
            del self.buf[:self.pos]
            self.pos = 0


def _next_record(st: _Stream) -> Optional[bytes]:
    """The next record's data, its CRCs checked; None at the end of the stream."""
    if not st.need(1):
        return None
    if not st.need(12):
        raise CorruptRecordError("truncated record header")
    buf, pos = st.buf, st.pos
    head = bytes(buf[pos:pos + 8])
    (length,) = struct.unpack("<Q", head)
    (hcrc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
    if hcrc != _masked_crc(head):
        raise CorruptRecordError("record length CRC mismatch")
    if not st.need(16 + length):
        raise CorruptRecordError("truncated record")
    buf = st.buf
    data = bytes(buf[pos + 12:pos + 12 + length])
    (dcrc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
    if dcrc != _masked_crc(data):
        raise CorruptRecordError("record data CRC mismatch")
    st.advance(16 + length)
    return data


def iter_records(fileobj: BinaryIO, gzipped: bool = True, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Reads TFRecords from a gzip stream (one or more members), checking every CRC.

    Raises CorruptRecordError on a bad CRC or a truncated file.
    """
    st = _Stream(fileobj, gzipped, chunk)
    index = 0
    while True:
        try:
            data = _next_record(st)
        except CorruptRecordError as e:
            if str(e).startswith("damaged gzip"):  # found where a compressed chunk is inflated, not per record
                raise
            raise CorruptRecordError(f"{e} at record {index + 1} (after {index} good records)") from None
        if data is None:
            return
        index += 1
        yield data
