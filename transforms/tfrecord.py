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
from typing import BinaryIO, Iterable, Iterator

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


def iter_records(fileobj: BinaryIO, gzipped: bool = True, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Reads TFRecords from a gzip stream (one or more members), checking every CRC.

    Raises CorruptRecordError on a bad CRC or a truncated file.
    """
    z = zlib.decompressobj(31) if gzipped else None
    buf = bytearray()
    pos = 0
    eof = False

    def inflate(raw: bytes) -> None:
        nonlocal z
        try:
            buf.extend(z.decompress(raw))
            while z.eof and z.unused_data:  # the next gzip member follows
                rest = z.unused_data
                z = zlib.decompressobj(31)
                buf.extend(z.decompress(rest))
        except zlib.error as e:  # a damaged byte: bad deflate data, header or gzip CRC
            raise CorruptRecordError(f"damaged gzip stream ({e})") from None

    def need(k: int) -> bool:
        nonlocal eof
        while not eof and len(buf) - pos < k:
            raw = fileobj.read(chunk)
            if not raw:
                eof = True
                if z is not None:
                    try:
                        buf.extend(z.flush())
                    except zlib.error as e:
                        raise CorruptRecordError(f"damaged gzip stream ({e})") from None
                    if not z.eof:
                        raise CorruptRecordError("gzip stream ended early (truncated file)")
            elif z is not None:
                inflate(raw)
            else:
                buf.extend(raw)
        return len(buf) - pos >= k

    index = 0
    while True:
        try:
            if not need(1):
                return
            if not need(12):
                raise CorruptRecordError("truncated record header")
            head = bytes(buf[pos:pos + 8])
            (length,) = struct.unpack("<Q", head)
            (hcrc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
            if hcrc != _masked_crc(head):
                raise CorruptRecordError("record length CRC mismatch")
            if not need(16 + length):
                raise CorruptRecordError("truncated record")
            data = bytes(buf[pos + 12:pos + 12 + length])
            (dcrc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
            if dcrc != _masked_crc(data):
                raise CorruptRecordError("record data CRC mismatch")
        except CorruptRecordError as e:
            if str(e).startswith("damaged gzip"):  # found where a compressed chunk is inflated, not per record
                raise
            raise CorruptRecordError(f"{e} at record {index + 1} (after {index} good records)") from None
        index += 1
        pos += 16 + length
        if pos > (1 << 22):
            del buf[:pos]
            pos = 0
        yield data
