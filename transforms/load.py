"""Loading a case: the `.vital` file through Beam's FileSystems (local, s3://,
gs://) parsed by the `vitaldb` library, and the clinical table.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import math
import os
import tempfile
import threading
import time
import types
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import google_crc32c
import numpy as np
import pandas as pd
import vitaldb
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from transforms import spec
from transforms.cases import case_file_candidates

_LOG = logging.getLogger(__name__)
_CHUNK = 8 << 20
# vitaldb's own bound on one recording (7 days); a longer span comes from a
# bad header time and would allocate a grid of years.
MAX_RECORDING_S = 7 * 24 * 3600


class CaseError(Exception):
    """A data problem with one case: recorded as its failure reason."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class CaseTodo:
    """A case to process; `previous_input` when it is processed again because
    its input file changed since its commit."""

    case_id: int
    previous_input: Optional[dict] = None


@dataclass
class RawCase:
    case_id: int
    path: str
    raw: np.ndarray  # (T, len(spec.source_tracks)) float, NaN = no record in that second
    tracks_found: list[str]
    # seconds: "load" (all of load_case), "parse" (the vitaldb calls alone)
    timings: dict = field(default_factory=dict)
    row: Optional[dict] = None  # the case's clinical row, None if the table has none
    # The input file's identity: path, bytes, crc32c (of the bytes read), and
    # mtime (local) or etag (object store): provenance, and change detection.
    input: dict = field(default_factory=dict)
    previous_input: Optional[dict] = None  # the identity of an earlier commit of this case, if any
    clinical: dict = field(default_factory=dict)  # the clinical table's identity


def find_case_file(input_dir: str, case_id: int) -> str:
    for path in case_file_candidates(input_dir, case_id):
        if FileSystems.exists(path):
            return path
    raise CaseError("missing_file", "no " + " or ".join(p.rsplit("/", 1)[-1] for p in case_file_candidates(input_dir, case_id))
                    + f" in {input_dir}")


class _TrackedGzipReader(gzip._GzipReader):
    """The stream reader behind GzipFile's buffer; it remembers a failure."""

    def read(self, size=-1):
        try:
            return super().read(size)
        except (EOFError, OSError, zlib.error) as e:
            _PARSE_STATE.error = e
            raise


class _TrackedGzipFile(gzip.GzipFile):
    """GzipFile whose failed reads are remembered.

    vitaldb swallows EOFError (a truncated file) and any other exception
    while it reads records, and returns what it had: partial data with no
    error. It reads through `gzip.GzipFile`, whose stream reader raises
    EOFError on a stream that ends early and BadGzipFile on a CRC/length
    mismatch, so this class, installed as vitaldb's `gzip.GzipFile`, records
    such an error for the caller. The hook sits on the reader that refills
    the buffer (a few thousand calls per file), not on GzipFile.read, which
    vitaldb calls ~200,000 times for a 4-hour case (wrapping that cost
    0.05-0.08 s per case, measured). vitaldb stops reading a packed file
    after the last wanted track, so a file damaged only beyond our tracks
    still yields complete data, and is accepted. Checking the stream here
    instead of in a separate pass saves inflating every file twice (0.16 s
    of a 0.5 s parse of a 4-hour case, measured).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mode == gzip.READ:
            hasher = getattr(_PARSE_STATE, "hasher", None)
            if hasher is not None:  # the file's content identity, hashed as vitaldb reads it
                self.fileobj = hasher.wrap(self.fileobj)
            self._buffer = io.BufferedReader(_TrackedGzipReader(self.fileobj))


class FileHasher:
    """CRC-32C of a file's bytes (the checksum cloud object stores keep, e.g.
    GCS), computed while they are read for parsing, not in a second pass:
    `wrap` the raw file object vitaldb reads, then `finish` hashes only what
    vitaldb did not read (it stops after the last wanted track of a packed
    file); a seek falls back to a whole-file pass. CRC-32C, not SHA-256: on a
    4-hour file with waveforms (12.8 MB) it took 1.0 ms against 7.2 ms, i.e.
    5 % of the parse, measured."""

    def __init__(self):
        self._h = google_crc32c.Checksum()
        self._consumed = 0
        self._seeked = False

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self._consumed += len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest().decode()

    def wrap(self, raw):
        hasher = self

        class _Reading:
            def read(self, n=-1):
                data = raw.read(n)
                hasher.update(data)
                return data

            def seek(self, *a):
                hasher._seeked = True
                return raw.seek(*a)

            def __getattr__(self, name):
                return getattr(raw, name)
        return _Reading()

    def finish(self, local: str) -> str:
        """The digest, after hashing what the parse left unread."""
        if self._seeked:
            self._h, self._consumed = google_crc32c.Checksum(), 0
        # Unbuffered 1 MiB reads: 1.3 ms for the 12 MB a 4-hour case leaves
        # unread, against 5.4 ms in 8 MiB reads (allocation), measured.
        with open(local, "rb", buffering=0) as fh:
            fh.seek(self._consumed)
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                self._h.update(chunk)
        return self.hexdigest()


# Per parsing thread: the gzip error vitaldb swallowed, and the hasher to feed.
_PARSE_STATE = threading.local()
_PARSE_LOCK = threading.Lock()


def _install_tracked_gzip() -> None:
    mod = types.ModuleType("gzip")
    mod.__dict__.update(gzip.__dict__)
    mod.GzipFile = _TrackedGzipFile
    vitaldb.utils.gzip = mod


_install_tracked_gzip()


def is_local(path: str) -> bool:
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)


def input_state(path: str) -> dict:
    """What tells whether a case's input file changed, cheaply (no read):
    size and modification time locally, the object's checksum (S3: its ETag)
    on an object store."""
    if is_local(path):
        st = os.stat(path)
        return {"path": path, "bytes": st.st_size, "mtime": st.st_mtime}
    return {"path": path, "etag": FileSystems.checksum(path)}


def same_input(committed: dict, current: dict) -> bool:
    """Whether the file a case was committed from is still the same file."""
    keys = [k for k in ("path", "bytes", "mtime", "etag") if k in current]
    return bool(committed) and all(committed.get(k) == current[k] for k in keys)


@contextlib.contextmanager
def local_file(path: str) -> Iterator[tuple[str, dict, Optional[FileHasher]]]:
    """(a local path to parse, the input's identity so far, a hasher for the
    parse to feed or None): the file itself, or a worker-local copy of a
    remote one (s3://, gs://), streamed without decompressing, hashed while
    copied, and removed afterwards."""
    if is_local(path):
        yield path, input_state(path), FileHasher()
        return
    identity = input_state(path)
    with tempfile.TemporaryDirectory(prefix="master-poc-case-") as tmpdir:
        dst = os.path.join(tmpdir, "case.vital")
        size, hasher = 0, FileHasher()
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as src, open(dst, "wb") as out:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                hasher.update(chunk)
                out.write(chunk)
        yield dst, dict(identity, bytes=size, crc32c=hasher.hexdigest()), None


def _check_signature(local: str) -> None:
    """A .vital file is one gzip stream that starts with b"VITA"."""
    with open(local, "rb") as fh:
        head = fh.read(2)
    if not head:
        raise CaseError("corrupt_file", "empty file")
    if head != b"\x1f\x8b":
        raise CaseError("corrupt_file", "not a gzip/.vital file (wrong magic bytes)")
    try:
        with gzip.open(local, "rb") as fh:
            sign = fh.read(4)
    except (OSError, EOFError, zlib.error) as e:
        raise CaseError("corrupt_file", f"damaged gzip stream ({type(e).__name__}: {e})") from None
    if sign != b"VITA":
        raise CaseError("corrupt_file", "a gzip file, but not a .vital file (no VITA signature)")


def _vitaldb_parse(local: str, hasher: Optional[FileHasher] = None, **kwargs) -> vitaldb.VitalFile:
    """vitaldb.VitalFile(local, **kwargs); CaseError if the gzip stream is
    damaged where vitaldb read it (see _TrackedGzipFile)."""
    with _PARSE_LOCK:
        _PARSE_STATE.error = None
        _PARSE_STATE.hasher = hasher
        try:
            vf = vitaldb.VitalFile(local, **kwargs)
        except (OSError, EOFError, ValueError, IndexError, KeyError, zlib.error) as e:
            raise CaseError("corrupt_file", f"vitaldb could not parse it ({type(e).__name__}: {e})") from None
        finally:
            _PARSE_STATE.hasher = None
        err = _PARSE_STATE.error
    if isinstance(err, EOFError):
        raise CaseError("corrupt_file", "truncated file (gzip stream ends early)")
    if err is not None:
        raise CaseError("corrupt_file", f"damaged gzip stream ({type(err).__name__}: {err})")
    return vf


def parse_vital(local: str, tracks: list[str], hasher: Optional[FileHasher] = None) -> vitaldb.VitalFile:
    """vitaldb parse of the given tracks (full Device/TRACK names), feeding
    `hasher` with the file's bytes as they are read."""
    _check_signature(local)
    return _vitaldb_parse(local, hasher, track_names=list(tracks))


SHOW_TRACKS = 12


def describe_tracks(local: str) -> str:
    """What a file without any wanted track holds: its track names (the
    first dozen, then a count), so the device that wrote it is plain to
    see. Reads the track list only (vitaldb's header_only); failure path."""
    names = list(_vitaldb_parse(local, header_only=True).trks)
    if not names:
        return "the file holds no tracks at all"
    shown = ", ".join(names[:SHOW_TRACKS])
    more = f" and {len(names) - SHOW_TRACKS} more" if len(names) > SHOW_TRACKS else ""
    return f"the file has {len(names)} track(s): {shown}{more}"


def load_case(input_dir: str, case_id: int, fs: spec.FeatureSpec = spec.DEFAULT_SPEC) -> RawCase:
    """Reads one case's numeric source tracks (those of `fs`) on the 1 s grid.

    Raises CaseError for a missing, corrupt or empty file, or one with none of
    the wanted tracks.
    """
    t0 = time.perf_counter()
    path = find_case_file(input_dir, case_id)
    tracks = fs.source_tracks
    with local_file(path) as (local, identity, hasher):
        t1 = time.perf_counter()
        vf = parse_vital(local, tracks, hasher)
        parse = time.perf_counter() - t1
        if hasher is not None:
            identity["crc32c"] = hasher.finish(local)
        # Only exact names: vitaldb matches by suffix and could hand us another track.
        found = [t for t in tracks if t in vf.trks]
        if not found:
            raise CaseError("no_tracks", "none of the wanted numeric tracks is in the file; "
                            + describe_tracks(local))
    if not any(vf.trks[t].recs for t in found):
        raise CaseError("no_tracks", f"the wanted tracks {found[:SHOW_TRACKS]} hold no records")
    if not (vf.dtend > vf.dtstart):
        raise CaseError("corrupt_file", f"no valid recording period (dtstart {vf.dtstart}, dtend {vf.dtend})")
    if vf.dtend - vf.dtstart > MAX_RECORDING_S:
        raise CaseError("corrupt_file", f"implausible recording length {vf.dtend - vf.dtstart:.0f} s "
                        f"(dtstart {vf.dtstart}, dtend {vf.dtend}; at most {MAX_RECORDING_S} s)")
    T = int(math.ceil(vf.dtend - vf.dtstart))
    raw = np.full((T, len(tracks)), np.nan, dtype=np.float64)
    t1 = time.perf_counter()
    cols = vf.to_numpy(found, 1)
    del vf  # freeing vitaldb's parsed records (many small objects) is part of parsing too
    parse += time.perf_counter() - t1
    if cols.ndim == 1:
        cols = cols[:, None]
    idx = [tracks.index(t) for t in found]
    raw[:, idx] = cols[:T]
    return RawCase(case_id, path, raw, found, {"load": time.perf_counter() - t0, "parse": parse}, input=identity)


# ---- clinical table -----------------------------------------------------------

CLINICAL_COLUMNS = ("caseid", "age", "sex", "height", "weight", "bmi", "asa", "anestart", "aneend", "caseend")


class ClinicalTableError(ValueError):
    pass


@dataclass(frozen=True)
class ClinicalTable:
    """The clinical table as the pipeline uses it: one row per case (plain
    Python values, NaN -> None) and the cases that cannot be trusted because
    the table holds two or more different rows for them."""

    path: str
    rows: dict  # case id -> {column: value}
    duplicates: dict = field(default_factory=dict)  # case id -> detail naming the rows
    identity: dict = field(default_factory=dict)  # {"path", "bytes", "sha256"} of the table as read

    def row(self, case_id: int) -> Optional[dict]:
        return self.rows.get(case_id)

    def to_json(self) -> dict:
        return {"path": self.path, "rows": {str(k): v for k, v in self.rows.items()},
                "duplicates": {str(k): v for k, v in self.duplicates.items()}, "identity": self.identity}

    @staticmethod
    def from_json(d: dict) -> "ClinicalTable":
        return ClinicalTable(d["path"], {int(k): v for k, v in d["rows"].items()},
                             {int(k): v for k, v in d.get("duplicates", {}).items()}, d.get("identity") or {})


def _plain(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def _duplicate_detail(path: str, rows: pd.DataFrame) -> str:
    """Names the differing rows (1-based data rows; the header is line 1) and
    the columns in which they differ."""
    differ = [c for c in rows.columns if rows[c].astype(str).nunique(dropna=False) > 1]
    shown = "; ".join(f"{c}: " + " vs ".join(repr(_plain(v)) for v in rows[c]) for c in differ[:6])
    nums = ", ".join(str(int(i) + 1) for i in rows.index)
    return (f"{len(rows)} different rows in {path.rsplit('/', 1)[-1]} (data rows {nums}, file lines "
            f"{', '.join(str(int(i) + 2) for i in rows.index)}) differ in {shown}")


def read_clinical(path: str, case_ids: Optional[list[int]] = None) -> ClinicalTable:
    """Reads VitalDB's clinical table once.

    Identical duplicate rows count as one row; a case with two or more
    different rows is listed in `duplicates` (it fails as
    duplicate_clinical_row). Raises ClinicalTableError with a clear message
    for an unreadable or malformed table.
    """
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as fh:
            data = fh.read()
    except Exception as e:  # any filesystem's "cannot open" (IOError, BeamIOError, botocore...)
        raise ClinicalTableError(f"cannot read clinical table {path}: {e}") from None
    try:
        df = pd.read_csv(io.BytesIO(data))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ClinicalTableError(f"clinical table {path} is not a readable CSV: {e}") from None
    if "caseid" not in df.columns:
        raise ClinicalTableError(f"clinical table {path} has no 'caseid' column (columns: {list(df.columns)[:10]})")
    ids = pd.to_numeric(df["caseid"], errors="coerce")
    if ids.isna().any():
        bad = df.loc[ids.isna(), "caseid"].head(3).tolist()
        raise ClinicalTableError(f"clinical table {path}: non-numeric caseid values {bad}")
    df = df.assign(caseid=ids.astype(np.int64))
    if case_ids is not None:
        df = df[df["caseid"].isin(set(case_ids))]
    df = df.drop_duplicates()  # identical rows are one row
    counts = df["caseid"].value_counts()
    duplicates = {int(c): _duplicate_detail(path, df[df["caseid"] == c]) for c in sorted(counts[counts > 1].index)}
    cols = [c for c in CLINICAL_COLUMNS if c in df.columns]
    rows: dict[int, dict] = {}
    for rec in df[~df["caseid"].isin(set(duplicates))][cols].to_dict("records"):
        rows[int(rec["caseid"])] = {k: _plain(v) for k, v in rec.items()}
    return ClinicalTable(path, rows, duplicates,
                         {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
