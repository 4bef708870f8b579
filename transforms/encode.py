"""Example encoding (the contract's schema) and TFRecord framing.

Examples are serialized here, deterministically: the bytes are exactly
protobuf's deterministic serialization of the tf.train.Example (map keys
sorted), so the same input gives the same bytes in every process, and a
dataset can be rebuilt byte for byte. (tfx-bsl's C++ encoder, used before,
writes the feature map in a per-process hash order: the same case gave
different bytes on every run. It also measured 2-3x slower than this
writer for a 470-window case: 8.6-15 ms against 3.5-4 ms.) TFRecord framing
and GZIP are done here too, so the same bytes can be written to any Beam
filesystem (local, s3://, gs://) without TensorFlow in the workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import deflate
import numpy as np
from tfx_bsl.coders import example_coder

from transforms.tfrecord import frame_records
from transforms.tfrecord import length_delimited as _ld
from transforms.tfrecord import varint as _varint

# The bytes an output is made of; part of its fingerprint (an output keeps one
# format). 3: deterministic example serialization; each case compressed once,
# by libdeflate at level 6, as gzip members of up to 32 windows (stage 2
# interleaves members of different patients by copying bytes). On these
# members, against zlib at level 6, libdeflate 6 measured 2.1x the speed for
# 5 % more bytes (7: 1.6x, +0.6 %; 5: 2.4x, +22 %).
FORMAT_VERSION = "3"
GZIP_LEVEL = 6
WINDOWS_PER_MEMBER = 32
FORMAT = {"version": FORMAT_VERSION, "files": "GZIP TFRecord of tf.train.Example",
          "example_bytes": "protobuf deterministic serialization (features sorted by name)",
          "compression": f"gzip members of up to {WINDOWS_PER_MEMBER} examples, deflate level {GZIP_LEVEL} "
                         "(libdeflate)"}


# The example's features (the contract's schema), declared once: the float
# features are CaseWindows' arrays of the same names; "observed" and
# "since_measured" only with --emit-mask and --emit-delta.
CASE_ID, WINDOW_START = "case_id", "window_start"
FLOAT_FEATURES = ("timeseries", "static", "targets", "observed", "since_measured")
OPTIONAL_FEATURES = {"observed": "emit_mask", "since_measured": "emit_delta"}  # feature -> the setting that adds it


@dataclass(frozen=True)
class ExampleFeature:
    name: str
    kind: str  # "float" or "int64"
    length: int


def example_features(window: int, n_features: int, n_static: int, n_targets: int, emit_mask: bool = False,
                     emit_delta: bool = False) -> tuple[ExampleFeature, ...]:
    """Every feature of an example, in the contract's order."""
    per_window = window * n_features
    lengths = {"timeseries": per_window, "static": n_static, "targets": n_targets, "observed": per_window,
               "since_measured": per_window}
    on = {"emit_mask": emit_mask, "emit_delta": emit_delta}
    floats = [ExampleFeature(n, "float", lengths[n]) for n in FLOAT_FEATURES
              if n not in OPTIONAL_FEATURES or on[OPTIONAL_FEATURES[n]]]
    return tuple(floats[:3] + [ExampleFeature(CASE_ID, "int64", 1), ExampleFeature(WINDOW_START, "int64", 1)]
                 + floats[3:])




# Field tags (field number << 3 | 2): Example.features = 1, Features.feature
# (map entry) = 1, entry key = 1, entry value = 2, Feature.float_list = 2,
# Feature.int64_list = 3, FloatList/Int64List.value (packed) = 1.
_T1, _T2, _T3 = 0x0A, 0x12, 0x1A


def _entry(key: str, feature: bytes) -> bytes:
    body = _ld(_T1, len(key)) + key.encode() + _ld(_T2, len(feature)) + feature
    return _ld(_T1, len(body)) + body


def _int64_entry(key: str, values: Iterable[int]) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    ilist = _ld(_T1, len(packed)) + packed
    return _entry(key, _ld(_T3, len(ilist)) + ilist)


def _float_entry_head(key: str, count: int) -> bytes:
    """Everything of a float feature's map entry before its 4*count value bytes."""
    nbytes = 4 * count
    flist_head = _ld(_T1, nbytes)
    feature_head = _ld(_T2, len(flist_head) + nbytes) + flist_head
    value_len = len(feature_head) + nbytes
    key_part = _ld(_T1, len(key)) + key.encode()
    body_len = len(key_part) + 1 + len(_varint(value_len)) + value_len
    return _ld(_T1, body_len) + key_part + _ld(_T2, value_len) + feature_head


def encode_examples(case_id: int, starts: np.ndarray, floats: Mapping[str, np.ndarray]) -> list[bytes]:
    """Serialized tf.train.Examples, one per window: the float features
    `floats` ({name: (n, k) array}, written as float32) plus int64 `case_id`
    and `window_start`. Feature order is the sorted names, as protobuf's
    deterministic serialization has it."""
    n = len(starts)
    if n == 0:
        return []
    cols = {k: np.ascontiguousarray(np.broadcast_to(v, (n,) + np.shape(v)[-1:]), dtype="<f4")
            for k, v in floats.items()}
    heads = {k: _float_entry_head(k, c.shape[1]) for k, c in cols.items()}
    case_part = _int64_entry(CASE_ID, [case_id])
    names = sorted(list(cols) + [CASE_ID, WINDOW_START])
    fixed = len(case_part) + sum(len(heads[k]) + 4 * cols[k].shape[1] for k in cols)
    out = []
    for i in range(n):
        start_part = _int64_entry(WINDOW_START, [starts[i]])
        parts = []
        for k in names:
            if k == CASE_ID:
                parts.append(case_part)
            elif k == WINDOW_START:
                parts.append(start_part)
            else:
                parts.append(heads[k])
                parts.append(cols[k][i].tobytes())
        out.append(_ld(_T1, fixed + len(start_part)) + b"".join(parts))
    return out


def examples_decoder(features: dict[str, str]):
    """A tfx-bsl decoder of serialized Examples into a RecordBatch holding only
    `features` ({name: "float" | "int"}), in C++."""
    from tensorflow_metadata.proto.v0 import schema_pb2
    schema = schema_pb2.Schema()
    for name, kind in features.items():
        schema.feature.add(name=name, type=schema_pb2.FLOAT if kind == "float" else schema_pb2.INT)
    return example_coder.ExamplesToRecordBatchDecoder(schema.SerializeToString())


# ---- TFRecord framing (transforms.tfrecord), compressed ---------------------------------

def gzip_records(records: Iterable[bytes], level: int = GZIP_LEVEL) -> bytes:
    """Framed records as one gzip member (the GZIP TFRecord format), by libdeflate."""
    return deflate.gzip_compress(frame_records(records), level)


def gzip_members(records: list[bytes], per_member: int, level: int = GZIP_LEVEL) -> tuple[bytes, list[list[int]]]:
    """Records as consecutive gzip members of up to `per_member` records each.

    A file of concatenated members is one valid GZIP TFRecord file
    (TensorFlow, zlib and this module read it through), so stage 2 can
    interleave members of different cases by copying bytes, without
    decompressing and compressing again. Returns the bytes and
    [[member bytes, member records], ...]."""
    parts, index = [], []
    for i in range(0, len(records), per_member):
        chunk = records[i:i + per_member]
        data = gzip_records(chunk, level)
        parts.append(data)
        index.append([len(data), len(chunk)])
    return b"".join(parts), index


@dataclass(frozen=True)
class CaseObject:
    """A case's examples as the bytes of its object (cases/<split>/<id>.tfrecord.gz):
    consecutive gzip members, and (member bytes, member records) of each, in order.
    A case without windows has none (and no object)."""

    data: bytes = b""
    members: tuple[tuple[int, int], ...] = ()

    @property
    def windows(self) -> int:
        return sum(records for _, records in self.members)


def case_object(examples: list[bytes]) -> CaseObject:
    """A case's serialized examples compressed as its object is written: gzip
    members of up to WINDOWS_PER_MEMBER examples at GZIP_LEVEL (gzip_members)."""
    if not examples:
        return CaseObject()
    data, members = gzip_members(examples, WINDOWS_PER_MEMBER, GZIP_LEVEL)
    return CaseObject(data, tuple((size, records) for size, records in members))
