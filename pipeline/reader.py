"""Reading an output from any framework: numpy only, no TensorFlow.

    from pipeline.reader import OutputReader

    for ex in OutputReader("output", "train"):            # one example at a time
        ex["timeseries"]                                    # (300, 16) float32, like static, targets
    for batch in OutputReader("output", "train", batch_size=64, shuffle_buffer=10_000, seed=0):
        batch["timeseries"]                                 # (64, 300, 16)
    OutputReader("output", "fold-3")                        # an output made with --folds
    OutputReader("s3://bucket/out", "train", worker=i, num_workers=n)   # file-level sharding

Each example is a dict of numpy arrays shaped from the output's metadata:
`timeseries` (window, features), `static` (6,), `targets` (targets,),
`case_id` and `window_start` (int64 scalars), and `observed` /
`since_measured` (window, features) when the output has them; batched,
each gains a leading batch axis. Every record's CRC is checked: a damaged
file raises DamagedFile naming it (as `master-poc-preprocess verify` does).
Files are split among workers by position (worker i of n reads files i,
i + n, ...: give each DataLoader worker its own share); with a shuffle
buffer the file order is shuffled too, from the seed (call `set_epoch` for
another order each epoch). Local paths are read directly; other locations
(s3://, gs://) through Beam's FileSystems, imported only then (and listed
by pipeline.output.storage, which tells "no files" from a failure).

How it is fast (numpy, one core): an output's examples are written by
transforms/encode.py as protobuf's deterministic serialization of one set
of features (map entries sorted by name, lists packed), so all its
records have one byte layout but for the values: the float payloads sit
at the same offsets in every record, and only the int64 varints
(case_id, window_start) vary in length, 1 to 9 bytes each. For each
combination of those lengths the reader builds the layout from the
metadata (a `_Layout`: where the payloads are, and every other byte: the
tags, lengths and keys, and the varints' continuation bits). Records are
decoded in groups (a batch, or 64 when examples are handed out one at a
time): records of one length lying one after another in the inflated
stream are one strided numpy view, checked against the layouts of that
length in one comparison, their payloads copied out in one assignment per
feature. A record that matches no layout (another writer's: another
feature order, a feature more, an unpacked list, a negative int64) is
decoded by the general parser, `parse_example`, which gives the same
arrays. Every record's two masked CRC-32Cs are checked as before (the
length's once per distinct length: a function of it), and every gzip
member's CRC-32 and size: members are inflated by zlib as raw deflate,
their CRC-32 computed by libdeflate (zlib's own took a third of the
inflating time).
"""
from __future__ import annotations

import functools
import glob
import json
import random
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import google_crc32c
import numpy as np

try:
    from deflate import crc32 as _crc32  # libdeflate's CRC-32: ~5x zlib's
except ImportError:  # pragma: no cover - deflate is a requirement of the package; zlib's gives the same
    _crc32 = zlib.crc32

from pipeline.output.names import METADATA_NAME, split_files_glob
from transforms.tfrecord import CorruptRecordError
from transforms.tfrecord import length_delimited as _ld

__all__ = ["OutputReader", "DamagedFile", "parse_example"]


class DamagedFile(IOError):
    """A split file that cannot be read through (a bad CRC, a damaged or truncated stream)."""


def _has_no_scheme(path: str) -> bool:
    """Whether a path has no scheme (no "://"), so is read directly: Beam's
    FileSystems would read it the same way, at the cost of importing Beam."""
    return "://" not in path


def _open(path: str):
    if _has_no_scheme(path):
        return open(path, "rb")
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _list(pattern: str) -> list[str]:
    """The files matching a glob, sorted; [] when none (or no folder) match."""
    if _has_no_scheme(pattern):
        return sorted(glob.glob(pattern))
    from pipeline.output import storage  # imports Beam: only for a path with a scheme
    return storage.list_files(pattern)


# ---- the file-level plan: a worker's files, and their order in an epoch ------------------

def _worker_files(output: str, split: str, worker: int, num_workers: int) -> list[str]:
    """A worker's share of a split's files, by position in the sorted listing:
    worker i of n reads files i, i + n, ..."""
    return _list(split_files_glob(output, split))[worker::num_workers]


def _epoch_order(files: list[str], seed: int, epoch: int) -> list[str]:
    """The files in a shuffled order from the seed and the epoch (the same on every worker)."""
    files = list(files)
    random.Random(f"{seed}:{epoch}").shuffle(files)
    return files


# ---- tf.train.Example, decoded with numpy: the general parser --------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or the varint) of a message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _varint(buf, pos)
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, value
        elif wire == 5:
            yield number, wire, pos, pos + 4
            pos += 4
        elif wire == 1:
            yield number, wire, pos, pos + 8
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf, start: int, end: int):
    """A tf.train.Feature: float_list -> float32 array, int64_list -> int64
    array, bytes_list -> list of bytes (packed or not)."""
    for kind, _, s, e in _fields(buf, start, end):
        if kind == 2:  # FloatList
            parts = []
            for _, wire, vs, ve in _fields(buf, s, e):
                parts.append(np.frombuffer(buf, "<f4", (ve - vs) // 4, vs) if wire == 2
                             else np.frombuffer(buf, "<f4", 1, vs))
            return np.concatenate(parts) if len(parts) != 1 else parts[0].copy()
        if kind == 3:  # Int64List
            values = []
            for _, wire, vs, ve in _fields(buf, s, e):
                if wire == 2:
                    pos = vs
                    while pos < ve:
                        v, pos = _varint(buf, pos)
                        values.append(_int64(v))
                else:
                    values.append(_int64(vs))
            return np.array(values, np.int64)
        if kind == 1:  # BytesList
            return [bytes(buf[vs:ve]) for _, _, vs, ve in _fields(buf, s, e)]
    return np.empty(0, np.float32)


def parse_example(record: bytes) -> dict[str, object]:
    """A serialized tf.train.Example as {feature name: values} (1-D arrays)."""
    buf = memoryview(record)
    out = {}
    for number, _, s, e in _fields(buf, 0, len(buf)):
        if number != 1:
            continue
        for entry_no, _, es, ee in _fields(buf, s, e):  # Features.feature: map entries
            if entry_no != 1:
                continue
            key = value = None
            for f, _, vs, ve in _fields(buf, es, ee):
                if f == 1:
                    key = bytes(buf[vs:ve]).decode()
                elif f == 2:
                    value = (vs, ve)
            if key is not None:
                out[key] = _feature(buf, *value) if value else np.empty(0, np.float32)
    return out


# ---- the fixed layout of this product's examples (the fast path) ------------------------



# The varint lengths the fast path takes for an int64 value: 1 to 9 bytes
# (0 <= value < 2**63); a 10-byte one (a negative value) goes to the general parser.
_MAX_VARINT = 9
# A group of fewer adjacent records of one length than this is gathered with
# the other short ones of its length (copied together) instead of viewed in place.
_MIN_RUN = 4


@dataclass
class _Layout:
    """One byte layout of a record: `idx` the positions of every byte that is
    not a float payload (the constant bytes and the int64 varints), whose
    bytes must satisfy (byte & mask) == want (a varint's bytes: the
    continuation bit set but on its last); where the payloads are."""
    length: int
    idx: np.ndarray
    mask: np.ndarray
    want: np.ndarray
    floats: list  # (name, offset in the record, bytes)
    ints: list  # (name, column in the gathered bytes, varint length)


@functools.lru_cache(maxsize=None)
def _entry(name: str, kind: str, length: int, k: int) -> tuple:
    """A map entry of Features, as parts (see _parts); k: an int64's varint length."""
    key = name.encode()
    if kind == "float":
        nbytes = 4 * length
        flist_head = _ld(0x0A, nbytes)
        feature_head = _ld(0x12, len(flist_head) + nbytes) + flist_head
        value = [("c", feature_head), ("f", name, nbytes)]
        value_len = len(feature_head) + nbytes
    else:
        ilist_len = 2 + k
        value = [("c", _ld(0x1A, ilist_len) + _ld(0x0A, k)), ("i", name, k)]
        value_len = len(_ld(0x1A, ilist_len)) + ilist_len
    key_part = _ld(0x0A, len(key)) + key
    body_head = key_part + _ld(0x12, value_len)
    return (("c", _ld(0x0A, len(body_head) + value_len) + body_head), *value)


def _parts(features: list[tuple[str, str, int]], varint_lengths: dict[str, int]) -> list[tuple]:
    """The bytes of an Example as transforms/encode.py writes it: its map
    entries sorted by key, each float list one packed field, each int64 list
    one packed field of one varint (of the given length); as ("c", constant
    bytes), ("f", name, payload bytes), ("i", name, varint bytes)."""
    parts = [p for name, kind, length in sorted(features)
             for p in _entry(name, kind, length, varint_lengths.get(name, 0))]
    return [("c", _ld(0x0A, _length(parts)))] + parts


def _length(parts: list[tuple]) -> int:
    return sum(len(p[1]) if p[0] == "c" else p[2] for p in parts)


def _layout(parts: list[tuple]) -> _Layout:
    """The layout of a record made of these parts."""
    idx, mask, want, floats, ints = [], [], [], [], []
    pos = 0
    for p in parts:
        if p[0] == "c":
            idx += range(pos, pos + len(p[1]))
            mask += [0xFF] * len(p[1])
            want += list(p[1])
            pos += len(p[1])
        elif p[0] == "f":
            floats.append((p[1], pos, p[2]))
            pos += p[2]
        else:
            k = p[2]
            ints.append((p[1], len(idx), k))
            idx += range(pos, pos + k)
            mask += [0x80] * k
            want += [0x80] * (k - 1) + [0]
            pos += k
    return _Layout(pos, np.array(idx, np.intp), np.array(mask, np.uint8), np.array(want, np.uint8), floats, ints)


class _Layouts:
    """The layouts of an output's records by record length, built when first met."""

    def __init__(self, features: list[tuple[str, str, int]], shapes_fit: bool = True):
        """features: (name, "float" | "int64", values per example); shapes_fit:
        whether the shapes given to them hold their values (else every record
        goes to the general parser, which names the misfit)."""
        self.features = features
        ints = [n for n, kind, _ in features if kind != "float"]
        self.enabled = (shapes_fit and sys.byteorder == "little" and len(ints) <= 3
                        and all(kind == "float" or (kind == "int64" and length == 1)
                                for _, kind, length in features))
        self.ints = ints
        self.combos: Optional[dict[int, list[list]]] = None  # record length -> the _parts of that length
        self.built: dict[int, list[_Layout]] = {}

    def get(self, length: int) -> list[_Layout]:
        layouts = self.built.get(length)
        if layouts is None:
            if self.combos is None:
                combos: list[dict] = [{}]
                for n in self.ints:
                    combos = [dict(c, **{n: k}) for c in combos for k in range(1, _MAX_VARINT + 1)]
                self.combos = {}
                for c in combos:
                    parts = _parts(self.features, c)
                    self.combos.setdefault(_length(parts), []).append(parts)
            layouts = self.built[length] = [_layout(parts) for parts in self.combos.get(length, ())]
        return layouts


# ---- TFRecord framing, every CRC checked ------------------------------------------------

_READ = 1 << 20  # bytes read from the file at a time
_PIECE = 1 << 17  # compressed bytes inflated at a time (a gzip member of ours is ~20 KB)
_HEADER_PEEK = 64  # bytes looked at for a gzip member header (ours: 10)
_crc = google_crc32c.value
_unpack_head = struct.Struct("<QI").unpack_from
_unpack_crc = struct.Struct("<I").unpack_from


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc_takes_arrays() -> bool:
    """google_crc32c takes read-only buffers that need no release: numpy
    arrays (a slice of the inflated piece without a copy), not memoryviews."""
    try:
        return _crc(np.frombuffer(b"123456789", np.uint8)[1:]) == _crc(b"23456789")
    except TypeError:
        return False


_CRC_ON_ARRAYS = _crc_takes_arrays()


def _gzip_header(buf: bytes) -> Optional[int]:
    """The length of the gzip member header that buf begins with; None while
    buf holds only part of it."""
    if len(buf) < 10:
        return None
    if buf[0] != 0x1F or buf[1] != 0x8B or buf[2] != 8:
        raise CorruptRecordError("damaged gzip stream (not a gzip member header)")
    flags, pos = buf[3], 10
    if flags & 0xE0:
        raise CorruptRecordError("damaged gzip stream (unknown header flags set)")
    if flags & 4:  # FEXTRA: its length, then the field
        if len(buf) < 12:
            return None
        pos = 12 + int.from_bytes(buf[10:12], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = buf.find(b"\0", pos)
            if end < 0:
                return None
            pos = end + 1
    if flags & 2:  # FHCRC: the header's CRC-32, its low 16 bits
        if len(buf) < pos + 2:
            return None
        if zlib.crc32(buf[:pos]) & 0xFFFF != int.from_bytes(buf[pos:pos + 2], "little"):
            raise CorruptRecordError("damaged gzip stream (header CRC mismatch)")
        pos += 2
    return pos if len(buf) >= pos else None


def _inflated(fh) -> Iterator[bytes]:
    """The inflated bytes of a gzip stream of one or more members, in pieces.

    As zlib's gzip mode reads it, every member's CRC-32 and size checked, but
    the members' deflate streams inflated raw and their CRC-32 computed by
    libdeflate (zlib's own took a third of the time inflating took)."""
    z = None  # the current member's inflater: None before a member header; z.eof: before its trailer
    head = b""  # the part of a header or trailer in the pieces before
    crc = size = 0
    try:
        while True:
            raw = fh.read(_READ)
            if not raw:
                break
            view = memoryview(raw)
            for i in range(0, len(raw), _PIECE):
                data = view[i:i + _PIECE]
                while data:
                    if z is None:  # a member's header
                        buf = head + bytes(data[:_HEADER_PEEK])
                        n = _gzip_header(buf)
                        if n is None and len(data) > _HEADER_PEEK:
                            buf = head + bytes(data)
                            n = _gzip_header(buf)
                        if n is None:
                            head, data = buf, b""
                            continue
                        data = data[n - len(head):]
                        head = b""
                        z = zlib.decompressobj(-15)
                        crc = size = 0
                    elif z.eof:  # its trailer: CRC-32 and size of the inflated bytes
                        buf = head + bytes(data[:8 - len(head)])
                        if len(buf) < 8:
                            head, data = buf, b""
                            continue
                        data = data[8 - len(head):]
                        head = b""
                        if int.from_bytes(buf[:4], "little") != crc:
                            raise CorruptRecordError("damaged gzip stream (incorrect data check)")
                        if int.from_bytes(buf[4:], "little") != size & 0xFFFFFFFF:
                            raise CorruptRecordError("damaged gzip stream (incorrect length check)")
                        z = None
                    else:
                        out = z.decompress(data)
                        if out:
                            crc = _crc32(out, crc)
                            size += len(out)
                            yield out
                        data = z.unused_data if z.eof else b""
        if z is not None or head:
            raise CorruptRecordError("gzip stream ended early (truncated file)")
    except zlib.error as e:  # a damaged byte: bad deflate data
        raise CorruptRecordError(f"damaged gzip stream ({e})") from None


class _Framing:
    """TFRecords out of inflated pieces: per piece, the offsets and lengths of
    the records wholly in it, each CRC checked (a record across two pieces is
    copied out on its own)."""

    def __init__(self):
        self.heads: dict[int, int] = {}  # record length -> its header's masked CRC (checked)
        self.count = 0

    def _fail(self, what: str, more: int = 0) -> CorruptRecordError:
        """The error at the record after self.count + more good ones."""
        good = self.count + more
        return CorruptRecordError(f"{what} at record {good + 1} (after {good} good records)")

    def _head(self, buf, pos: int, more: int = 0) -> int:
        """The length in the record header at buf[pos:], its CRC checked."""
        length, hcrc = _unpack_head(buf, pos)
        if self.heads.get(length) != hcrc:
            if _masked(_crc(bytes(buf[pos:pos + 8]))) != hcrc:
                raise self._fail("record length CRC mismatch", more)
            self.heads[length] = hcrc
        return length

    def scan(self, buf: bytes, pos: int):
        """(offsets, lengths, where the rest begins, the error that stopped it or None)."""
        offs: list[int] = []
        lens: list[int] = []
        add_off, add_len = offs.append, lens.append
        n = len(buf)
        arr = np.frombuffer(buf, np.uint8) if _CRC_ON_ARRAYS else buf
        heads, unpack_head, unpack_crc, crc32c = self.heads, _unpack_head, _unpack_crc, _crc
        try:
            while pos + 12 <= n:
                length, hcrc = unpack_head(buf, pos)
                if heads.get(length) != hcrc:
                    self._head(buf, pos, len(offs))
                start = pos + 12
                end = start + length
                if end + 4 > n:
                    break
                crc = crc32c(arr[start:end])
                if (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF != unpack_crc(buf, end)[0]:
                    raise self._fail("record data CRC mismatch", len(offs))
                add_off(start)
                add_len(length)
                pos = end + 4
        except CorruptRecordError as e:
            self.count += len(offs)
            return offs, lens, pos, e
        self.count += len(offs)
        return offs, lens, pos, None

    def segments(self, fh) -> Iterator[tuple[bytes, list[int], list[int]]]:
        """(buffer, record offsets, record lengths) until the stream ends; a
        damaged record raises CorruptRecordError after the good ones before it."""
        carry = bytearray()
        for piece in _inflated(fh):
            start = 0
            if carry:  # complete the record begun in the previous piece
                if len(carry) < 12:
                    start = min(12 - len(carry), len(piece))
                    carry += piece[:start]
                    if len(carry) < 12:
                        continue
                length = self._head(carry, 0)
                take = min(16 + length - len(carry), len(piece) - start)
                carry += piece[start:start + take]
                start += take
                if len(carry) < 16 + length:
                    continue
                record = bytes(carry)
                carry = bytearray()
                offs, lens, _, err = self.scan(record, 0)
                if offs:
                    yield record, offs, lens
                if err is not None:
                    raise err
            offs, lens, pos, err = self.scan(piece, start)
            if offs:
                yield piece, offs, lens
            if err is not None:
                raise err
            carry = bytearray(piece[pos:])
        if carry:
            raise self._fail("truncated record header" if len(carry) < 12 else "truncated record")


# ---- the record stream: segments of files, in groups or through a shuffle buffer ------

def _segments(files) -> Iterator[tuple]:
    """The record stream of files in order: (buffer, record offsets, record
    lengths, path) per inflated piece; a damaged file raises DamagedFile."""
    for path in files:
        framing = _Framing()
        try:
            with _open(path) as fh:
                for buf, offs, lens in framing.segments(fh):
                    yield buf, offs, lens, path
        except (CorruptRecordError, OSError, ValueError, IndexError, struct.error) as e:
            raise DamagedFile(f"{path}: damaged, unreadable: {e}") from None


def _groups(segments, size: int, drop_remainder: bool, flush_on_error: bool = False) -> Iterator[list]:
    """The segments cut into groups of `size` records (lists of segments);
    with `flush_on_error`, the records before a damaged one are a last group."""
    group, have = [], 0
    try:
        for buf, offs, lens, path in segments:
            i, m = 0, len(offs)
            while i < m:
                take = min(size - have, m - i)
                group.append((buf, offs, lens, path) if take == m else
                             (buf, offs[i:i + take], lens[i:i + take], path))
                have += take
                i += take
                if have == size:
                    yield group
                    group, have = [], 0
    except DamagedFile:
        if flush_on_error and group:
            yield group
        raise
    if group and not drop_remainder:
        yield group


def _shuffled(files: list[str], buffer_size: int, seed: int, epoch: int) -> Iterator[tuple]:
    """A shuffle buffer (as tf.data's) of records, one segment each: fill it,
    then hand out a random element for each new one; files in the epoch's order."""
    rng = np.random.default_rng([seed, epoch])
    buf: list[tuple] = []
    for data, offs, lens, path in _segments(_epoch_order(files, seed, epoch)):
        for o, n in zip(offs, lens):
            rec = (data[o:o + n], [0], [n], path)
            if len(buf) < buffer_size:
                buf.append(rec)
                continue
            i = int(rng.integers(len(buf)))
            yield buf[i]
            buf[i] = rec
    order = rng.permutation(len(buf))
    for i in order:
        yield buf[i]


# ---- decoding groups of records into batches ---------------------------------------------

_CHUNK = 64  # records decoded together when examples are handed out one at a time


def _shapes(fmt: dict) -> dict[str, tuple]:
    """Each feature's shape in an example, from the metadata's format."""
    window, n_features = fmt["shapes"]["timeseries"]
    shapes: dict[str, tuple] = {}
    for name, f in fmt["features"].items():
        if f["length"] == window * n_features:
            shapes[name] = (window, n_features)
        elif name in fmt["shapes"]:
            shapes[name] = tuple(fmt["shapes"][name])
        else:
            shapes[name] = () if f["length"] == 1 else (f["length"],)
    return shapes


class _Decoder:
    """Groups of records (lists of segments) decoded into arrays shaped from
    an output's format: records that match a layout of this product's
    examples by it, the others by the general parser. `decoded` counts the
    records decoded each way."""

    def __init__(self, fmt: dict):
        self.shapes = _shapes(fmt)
        self.dtypes = {n: np.float32 if f["type"] == "float" else np.int64 for n, f in fmt["features"].items()}
        self.layouts = _Layouts([(n, f["type"], f["length"]) for n, f in fmt["features"].items()],
                                all(int(np.prod(self.shapes[n])) == f["length"] for n, f in fmt["features"].items()))
        self.decoded = {"layout": 0, "general": 0}

    def examples(self, segments) -> Iterator[dict]:
        """Examples one at a time, each its own arrays (decoded in groups of _CHUNK)."""
        names = list(self.shapes)
        for group in _groups(segments, _CHUNK, False, flush_on_error=True):
            try:
                batch = self.batch(group)
            except DamagedFile as e:  # hand out the good examples before the damaged one, then raise
                for buf, offs, lens, path in group:
                    for o, n in zip(offs, lens):
                        one = self.batch([(buf, [o], [n], path)])
                        yield {k: v[0, ...] for k, v in one.items()}
                raise e
            for i in range(len(batch[names[0]])):
                yield {k: batch[k][i, ...].copy() for k in names}

    def batch(self, group: list) -> dict:
        """The examples of a group of segments as a batch: {name: (n, *shape) array}."""
        n = sum(len(seg[1]) for seg in group)
        out = {k: np.empty((n,) + s, self.dtypes[k]) for k, s in self.shapes.items()}
        flat = {k: v.reshape(n, -1) for k, v in out.items()}
        raw = {k: v.view(np.uint8) for k, v in flat.items() if v.dtype == np.float32}
        loose: dict[int, list] = {}  # record length -> [(buffer, offset, row, path)] of short runs
        row = 0
        for buf, offs, lens, path in group:
            m, i = len(offs), 0
            while i < m:
                length, j = lens[i], i + 1
                stride = length + 16
                while j < m and lens[j] == length and offs[j] == offs[j - 1] + stride:
                    j += 1
                if j - i >= _MIN_RUN:
                    self._run(flat, raw, buf, offs[i], stride, length, j - i, slice(row + i, row + j), [path])
                else:
                    loose.setdefault(length, []).extend((buf, offs[k], row + k, path) for k in range(i, j))
                i = j
            row += m
        for length, items in loose.items():
            joined = b"".join([memoryview(b)[o:o + length] for b, o, _, _ in items])
            rows = np.array([r for _, _, r, _ in items], np.intp)
            self._run(flat, raw, joined, 0, length, length, len(items), rows, [p for _, _, _, p in items])
        return out

    def _run(self, flat: dict, raw: dict, buf, off: int, stride: int, length: int, n: int, rows, paths: list) -> None:
        """Decodes n records of one length, at buf[off + i * stride], into the
        batch's rows `rows` (a slice or an index array): by a layout all that
        match one, the others by the general parser."""
        left = None  # the indices of the records not yet decoded (None: all)
        if self.layouts.enabled:
            view = np.ndarray((n, length), np.uint8, buf, off, (stride, 1))
            for lay in self.layouts.get(length):
                sub = view if left is None else view[left]
                got = sub[:, lay.idx]
                ok = ((got & lay.mask) == lay.want).all(axis=1)
                if ok.all():
                    _extract(flat, raw, sub, got, lay, rows if left is None else _rows(rows, left))
                    left = np.empty(0, np.intp)
                    break
                if ok.any():
                    at = np.arange(n)[ok] if left is None else left[ok]
                    _extract(flat, raw, sub[ok], got[ok], lay, _rows(rows, at))
                left = (np.arange(n) if left is None else left)[~ok]
        todo = range(n) if left is None else left.tolist()
        self.decoded["general"] += len(todo)
        self.decoded["layout"] += n - len(todo)
        mv = memoryview(buf)
        for i in todo:
            start = off + i * stride
            try:
                ex = self._shaped(parse_example(bytes(mv[start:start + length])))
            except (ValueError, IndexError, OverflowError, struct.error) as e:  # Overflow: a varint past 64 bits
                raise DamagedFile(f"{paths[i] if len(paths) > 1 else paths[0]}: damaged, unreadable: {e}") from None
            r = rows.start + i if isinstance(rows, slice) else rows[i]
            for k, v in ex.items():
                flat[k][r] = v.reshape(-1)

    def _shaped(self, ex: dict) -> dict:
        out = {}
        for name, shape in self.shapes.items():
            if name not in ex:
                raise ValueError(f"an example without feature {name!r}")
            out[name] = np.asarray(ex[name], self.dtypes[name]).reshape(shape)
        return out


def _extract(flat: dict, raw: dict, view: np.ndarray, got: np.ndarray, lay: _Layout, rows) -> None:
    """The values of records that match `lay`: float payloads copied as
    bytes, the int64 varints decoded from their gathered bytes."""
    for name, start, nbytes in lay.floats:
        raw[name][rows] = view[:, start:start + nbytes]
    for name, col, k in lay.ints:
        if k == 1:
            flat[name][rows, 0] = got[:, col]
            continue
        value = (got[:, col] & 0x7F).astype(np.uint64)
        for j in range(1, k):
            value |= (got[:, col + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
        flat[name][rows, 0] = value.view(np.int64)


def _rows(rows, at: np.ndarray) -> np.ndarray:
    """The batch rows of a run's records `at`, the run's rows a slice or an index array."""
    return rows.start + at if isinstance(rows, slice) else rows[at]


# ---- the reader: the plan, the record stream and the decoder together --------------------

class OutputReader:
    """An output's split, read as examples or batches (see the module's
    docstring). `decoded` counts the records decoded so far by the layout of
    this product's examples and by the general parser."""

    def __init__(self, output: str, split: str, *, batch_size: Optional[int] = None, drop_remainder: bool = False,
                 shuffle_buffer: int = 0, seed: int = 0, worker: int = 0, num_workers: int = 1):
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} of {num_workers}: expected 0 <= worker < num_workers")
        self.output = output.rstrip("/")
        with _open(f"{self.output}/{METADATA_NAME}") as fh:
            self.metadata = json.loads(fh.read())
        splits = list(self.metadata["splits"])
        if split not in splits:
            raise ValueError(f"{output} has no split {split!r} (it has {', '.join(splits)})")
        self.split = split
        self._decoder = _Decoder(self.metadata["format"])
        self.shapes, self.dtypes = self._decoder.shapes, self._decoder.dtypes
        # Records decoded so far by a layout (the fast path) and by the general parser.
        self.decoded = self._decoder.decoded
        self.files = _worker_files(self.output, split, worker, num_workers)
        self.batch_size, self.drop_remainder = batch_size, drop_remainder
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Another shuffle order (the seed plus the epoch), as the same on every worker."""
        self.epoch = epoch

    def examples(self) -> Iterator[dict]:
        """Every example of this worker's files, in file order (no shuffle, no batches)."""
        return self._decoder.examples(_segments(self.files))

    def __iter__(self) -> Iterator[dict]:
        if self.shuffle_buffer > 0:
            records = _shuffled(self.files, self.shuffle_buffer, self.seed, self.epoch)
        else:
            records = _segments(self.files)
        if not self.batch_size:
            yield from self._decoder.examples(records)
            return
        for group in _groups(records, self.batch_size, self.drop_remainder):
            yield self._decoder.batch(group)
