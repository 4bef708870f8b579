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
(s3://, gs://) through Beam's FileSystems, imported only then.
"""
from __future__ import annotations

import glob
import json
import random
import struct
from typing import Iterator, Optional

import numpy as np

from pipeline.names import METADATA_NAME, split_files_glob
from transforms.tfrecord import CorruptRecordError, iter_records

__all__ = ["OutputReader", "DamagedFile", "parse_example"]


class DamagedFile(IOError):
    """A split file that cannot be read through (a bad CRC, a damaged or truncated stream)."""


def _is_local(path: str) -> bool:
    """Whether to read it directly: a path without a scheme (Beam's FileSystems
    would read it the same way, at the cost of importing Beam)."""
    return "://" not in path


def _open(path: str):
    if _is_local(path):
        return open(path, "rb")
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _list(pattern: str) -> list[str]:
    if _is_local(pattern):
        return sorted(glob.glob(pattern))
    from apache_beam.io.filesystems import FileSystems
    try:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception as e:  # BeamIOError: no such folder (an empty split), else a real error
        if "No files found" in str(e) or "not found" in str(e).lower():
            return []
        raise


# ---- tf.train.Example, decoded with numpy ------------------------------------------

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


# ---- the reader ----------------------------------------------------------------------

class OutputReader:
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
        fmt = self.metadata["format"]
        window, n_features = fmt["shapes"]["timeseries"]
        # Each feature's shape in an example, from the metadata.
        self.shapes: dict[str, tuple] = {}
        for name, f in fmt["features"].items():
            if f["length"] == window * n_features:
                self.shapes[name] = (window, n_features)
            elif name in fmt["shapes"]:
                self.shapes[name] = tuple(fmt["shapes"][name])
            else:
                self.shapes[name] = () if f["length"] == 1 else (f["length"],)
        self.dtypes = {n: np.float32 if f["type"] == "float" else np.int64 for n, f in fmt["features"].items()}
        files = _list(split_files_glob(self.output, split))
        self.files = files[worker::num_workers]
        self.batch_size, self.drop_remainder = batch_size, drop_remainder
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Another shuffle order (the seed plus the epoch), as the same on every worker."""
        self.epoch = epoch

    def examples(self) -> Iterator[dict]:
        """Every example of this worker's files, in file order (no shuffle, no batches)."""
        for path in self.files:
            yield from self._file(path)

    def _file(self, path: str) -> Iterator[dict]:
        try:
            with _open(path) as fh:
                for rec in iter_records(fh):
                    yield self._shaped(parse_example(rec))
        except (CorruptRecordError, OSError, ValueError, IndexError, struct.error) as e:
            raise DamagedFile(f"{path}: damaged, unreadable: {e}") from None

    def _shaped(self, ex: dict) -> dict:
        out = {}
        for name, shape in self.shapes.items():
            if name not in ex:
                raise ValueError(f"an example without feature {name!r}")
            out[name] = np.asarray(ex[name], self.dtypes[name]).reshape(shape)
        return out

    def __iter__(self) -> Iterator[dict]:
        stream = self._shuffled() if self.shuffle_buffer > 0 else self.examples()
        if not self.batch_size:
            yield from stream
            return
        batch: list[dict] = []
        for ex in stream:
            batch.append(ex)
            if len(batch) == self.batch_size:
                yield self._stack(batch)
                batch = []
        if batch and not self.drop_remainder:
            yield self._stack(batch)

    def _shuffled(self) -> Iterator[dict]:
        """A shuffle buffer (as tf.data's): fill it, then hand out a random
        element for each new one; files in a seeded order too."""
        rng = np.random.default_rng([self.seed, self.epoch])
        files = list(self.files)
        random.Random(f"{self.seed}:{self.epoch}").shuffle(files)
        buf: list[dict] = []
        for path in files:
            for ex in self._file(path):
                if len(buf) < self.shuffle_buffer:
                    buf.append(ex)
                    continue
                i = int(rng.integers(len(buf)))
                yield buf[i]
                buf[i] = ex
        order = rng.permutation(len(buf))
        for i in order:
            yield buf[i]

    @staticmethod
    def _stack(batch: list[dict]) -> dict:
        return {k: np.stack([ex[k] for ex in batch]) for k in batch[0]}
