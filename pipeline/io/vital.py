"""Loading a case: its `.vital` file, local or streamed from an object store
or a web server (pipeline.io.sources), parsed by the `vitaldb` library as it
arrives (vitaldb's gzip and urlopen are hooked once, at import, so that it
reads only the streams this pipeline opened); or its track list alone.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import math
import threading
import time
import types
import zlib
from dataclasses import dataclass, field
from typing import Optional

import google_crc32c
import numpy as np
import vitaldb

from pipeline.io import remote
from pipeline.io.identity import FileIdentity, TableIdentity, known_fields
from pipeline.io.sources import Source
from transforms import spec

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
    previous_input: Optional[FileIdentity] = None
    located: Optional[tuple[str, FileIdentity]] = None  # when already found (sources.Source.locate)


@dataclass
class StepSeconds:
    """A case's seconds per step of stage 1, for the benchmark and for finding
    slow cases: load (all of load_case), parse (vitaldb's calls within it),
    transform, encode, compress (none for a case without windows) and write
    (its object; the marker's own write is not in them). Begun here, added
    to on the way to the case's done marker."""

    load: Optional[float] = None
    parse: Optional[float] = None
    transform: Optional[float] = None
    encode: Optional[float] = None
    compress: Optional[float] = None
    write: Optional[float] = None

    def items(self) -> list[tuple[str, float]]:
        """(step, seconds) of the steps timed, in order."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def to_json(self) -> dict:
        return {k: round(v, 4) for k, v in self.items()}

    @staticmethod
    def from_json(d) -> "StepSeconds":
        return StepSeconds(**known_fields(StepSeconds, d or {}))


@dataclass
class RawCase:
    case_id: int
    path: str
    raw: np.ndarray  # (T, len(spec.source_tracks)) float, NaN = no record in that second
    tracks_found: list[str]
    timings: StepSeconds = field(default_factory=StepSeconds)  # load and parse
    row: Optional[dict] = None  # the case's clinical row, None if the table has none
    # The input file's identity (pipeline.io.sources.Source.stat) with what reading it
    # found (pipeline.io.identity): provenance, and change detection.
    input: Optional[FileIdentity] = None
    # The identity of an earlier commit of this case, when the file's content changed
    # since (FileIdentity.content_changed; a touched file with the same bytes is no change).
    changed_input: Optional[FileIdentity] = None
    clinical: Optional[TableIdentity] = None  # the clinical table's identity
    split_key: str = ""  # the case's split key, as the clinical table gives it (ClinicalTable.split_key)


@dataclass
class CaseOrigin:
    """What stage 1 knows of a case beside what its transform finds
    (transforms.per_case.CaseFacts): its input file's identity, an earlier
    commit's where the file's content changed since, the clinical table's,
    the features' source tracks its file has (the cohort's require decides
    from them) and its seconds per step. It travels with the case from its
    load to its done marker."""

    input: Optional[FileIdentity] = None
    changed_input: Optional[FileIdentity] = None
    clinical: Optional[TableIdentity] = None
    tracks: Optional[list] = None
    timings: StepSeconds = field(default_factory=StepSeconds)

    @staticmethod
    def of(raw: RawCase) -> "CaseOrigin":
        return CaseOrigin(raw.input, raw.changed_input, raw.clinical, list(raw.tracks_found),
                          dataclasses.replace(raw.timings))


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
    mismatch (and a remote stream raises remote.TransferError when its
    retries run out), so this class, installed as vitaldb's `gzip.GzipFile`,
    records such an error for the caller. The hook sits on the reader that
    refills the buffer (a few thousand calls per file), not on
    GzipFile.read, which vitaldb calls ~200,000 times for a 4-hour case
    (wrapping that cost 0.05-0.08 s per case, measured). vitaldb stops
    reading a packed file after the last wanted track, so a file damaged
    only beyond our tracks still yields complete data, and is accepted.
    Checking the stream here instead of in a separate pass saves inflating
    every file twice (0.16 s of a 0.5 s parse of a 4-hour case, measured).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mode == gzip.READ:
            hasher = getattr(_PARSE_STATE, "hasher", None)
            if hasher is not None:  # the file's content identity, hashed as vitaldb reads it
                self.fileobj = hasher.wrap(self.fileobj)
            self._buffer = io.BufferedReader(_TrackedGzipReader(self.fileobj))
            if getattr(_PARSE_STATE, "tracks_only", False):
                self._buffer = _UntilRecords(self._buffer)


class _UntilRecords:
    """The inflated `.vital` stream, ended at its first record packet: what
    vitaldb reads for a file's track list alone (`read_track_names`).

    A `.vital` body is packets of [type: 1 byte][length: 4 bytes][data];
    device and track information (types 9 and 0) come before the records
    (type 1) in a packed file (the header's packed flag; VitalDB 1.0.1's
    layout). This reader follows the packet boundaries in the bytes it
    hands on and answers end-of-file at the first record packet, so vitaldb
    stops there, having parsed every track's information, and no more of the
    file is inflated or fetched. A file that is not packed may bring a
    device's tracks after records (plugged in later): it is read through.
    Parsing stays vitaldb's."""

    REC = 1

    def __init__(self, inner):
        self._inner = inner
        self._seen = bytearray()  # everything inflated so far (the header and track information)
        self._given = 0  # bytes handed on
        self._boundary: Optional[int] = None  # where the next packet starts
        self._stop: Optional[int] = None  # where the first record packet starts

    def _advance(self) -> None:
        seen = self._seen
        if self._boundary is None and len(seen) >= 10:  # VITA, version, header length, header
            header = int.from_bytes(seen[8:10], "little")
            if len(seen) < 10 + header:
                return
            if header < 27 or seen[10 + 26] != 1:
                # Not packed: track and device information may follow records (a device plugged in
                # later), so the whole stream is read; only a packed file has it all first.
                self._stop = -1
                return
            self._boundary = 10 + header
        while self._stop is None and self._boundary is not None and len(seen) > self._boundary:
            if seen[self._boundary] == self.REC:
                self._stop = self._boundary
            elif len(seen) >= self._boundary + 5:
                self._boundary += 5 + int.from_bytes(seen[self._boundary + 1:self._boundary + 5], "little")
                continue
            break

    def read(self, n: int = -1) -> bytes:
        if self._stop == -1:  # not packed: read through
            if self._given < len(self._seen):
                out = bytes(self._seen[self._given:] if n is None or n < 0 else self._seen[self._given:self._given + n])
                self._given += len(out)
                return out
            return self._inner.read(n)
        while True:
            if self._stop == -1:
                return self.read(n)
            end = len(self._seen) if self._stop is None else self._stop
            if self._given < end:
                take = end - self._given if n is None or n < 0 else min(n, end - self._given)
                out = bytes(self._seen[self._given:self._given + take])
                self._given += take
                return out
            if self._stop is not None:
                return b""
            chunk = self._inner.read(8192)
            if not chunk:
                return b""
            self._seen += chunk
            self._advance()

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name):
        return getattr(self._inner, name)


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


# Per parsing thread: the gzip error vitaldb swallowed, the hasher to feed,
# and the stream vitaldb's urlopen is to return.
_PARSE_STATE = threading.local()  # per thread: threads parse (and download) side by side


def _urlopen(url, *args, **kwargs):
    """vitaldb's `urllib.request.urlopen`: hands it the stream opened for
    this parse (Source.open: a local file, or a remote one with timeouts,
    retries and range reads). vitaldb never opens a URL itself: its urlopen
    has no timeout and no retry."""
    stream = getattr(_PARSE_STATE, "stream", None)
    if stream is None or stream.name != url:
        raise RuntimeError(f"vitaldb may only read streams this pipeline opened (asked for {url})")
    return stream


def _install_hooks() -> None:
    mod = types.ModuleType("gzip")
    mod.__dict__.update(gzip.__dict__)
    mod.GzipFile = _TrackedGzipFile
    vitaldb.utils.gzip = mod
    vitaldb.utils.request = types.SimpleNamespace(urlopen=_urlopen)


_install_hooks()


def check_signature(head: bytes) -> None:
    """A .vital file is one gzip stream that starts with b"VITA": CaseError
    naming what `head` (the file's first bytes) is instead."""
    if not head:
        raise CaseError("corrupt_file", "empty file")
    if head[:2] != b"\x1f\x8b":
        raise CaseError("corrupt_file", "not a gzip/.vital file (wrong magic bytes)")
    try:
        sign = zlib.decompressobj(31).decompress(head, 4)
    except zlib.error as e:
        raise CaseError("corrupt_file", f"damaged gzip stream (error: {e})") from None
    if len(sign) < 4 and len(head) < remote.HEAD_BYTES:
        raise CaseError("corrupt_file", "truncated file (gzip stream ends early)")
    if sign != b"VITA":
        raise CaseError("corrupt_file", "a gzip file, but not a .vital file (no VITA signature)")


class _TrackNames(list):
    """The track names handed to vitaldb, which also remembers every name
    vitaldb asks about (`in`, once per track of the file): the file's track
    list, to describe a file without our tracks with no second pass."""

    def __init__(self, names):
        super().__init__(names)
        self.seen: list[str] = []

    def __contains__(self, name) -> bool:
        self.seen.append(name)
        return super().__contains__(name)


def _transfer_error(e: Exception) -> CaseError:
    if isinstance(e, remote.NotFound):
        return CaseError("missing_file", str(e))
    return CaseError("download_failed", f"{e} (a rerun tries again)")


def parse_vital(stream, tracks: list[str], hasher: Optional[FileHasher] = None, tracks_only: bool = False):
    """vitaldb's parse of the given tracks (full Device/TRACK names) of a
    case file's stream (Source.open: local or remote, read as it arrives),
    feeding `hasher` with the file's bytes as they are read. Returns
    (VitalFile, every track name in the file). CaseError names what is
    wrong: a damaged or truncated gzip stream, not a .vital file, a failed
    download."""
    names = _TrackNames(tracks)
    _PARSE_STATE.error = None
    _PARSE_STATE.hasher = hasher
    _PARSE_STATE.stream = stream
    _PARSE_STATE.tracks_only = tracks_only
    failed: Optional[Exception] = None
    try:
        vf = vitaldb.VitalFile(stream.name, track_names=names)
    except (OSError, EOFError, ValueError, IndexError, KeyError, zlib.error) as e:
        failed, vf = e, None
    finally:
        _PARSE_STATE.hasher = None
        _PARSE_STATE.stream = None
        _PARSE_STATE.tracks_only = False
    err = _PARSE_STATE.error
    for e in (failed, err):
        if isinstance(e, remote.TransferError):
            raise _transfer_error(e)
    if failed is not None or err is not None:
        check_signature(stream.head)  # names a file that is no .vital file at all
    if failed is not None:
        raise CaseError("corrupt_file", f"vitaldb could not parse it ({type(failed).__name__}: {failed})")
    if isinstance(err, EOFError):
        raise CaseError("corrupt_file", "truncated file (gzip stream ends early)")
    if err is not None:
        raise CaseError("corrupt_file", f"damaged gzip stream ({type(err).__name__}: {err})")
    return vf, list(dict.fromkeys(names.seen))


SHOW_TRACKS = 12


def describe_tracks(names: list[str]) -> str:
    """What a file without any wanted track holds: its track names (the
    first dozen, then a count), so the device that wrote it is plain to see."""
    if not names:
        return "the file holds no tracks at all"
    shown = ", ".join(names[:SHOW_TRACKS])
    more = f" and {len(names) - SHOW_TRACKS} more" if len(names) > SHOW_TRACKS else ""
    return f"the file has {len(names)} track(s): {shown}{more}"


def _open_case(source: Source, case_id: int, located: Optional[tuple[str, FileIdentity]], transfer: remote.Transfer):
    """(path, identity, stream) of the case's file; CaseError if it is missing or cannot be fetched."""
    try:
        path, identity = located or source.locate(case_id, transfer)
        return path, identity, source.open(identity, transfer)
    except LookupError as e:
        raise CaseError("missing_file", str(e)) from None
    except remote.TransferError as e:
        raise _transfer_error(e) from None


def read_track_names(source: Source, case_id: int, located: Optional[tuple[str, FileIdentity]] = None
                     ) -> tuple[list[str], tuple[str, FileIdentity]]:
    """Every track name in the case's file, read by vitaldb from the file's
    track information alone (the records that follow are neither inflated nor
    fetched: _UntilRecords); and (path, identity) for the load that may
    follow. CaseError as load_case raises it."""
    path, identity, stream = _open_case(source, case_id, located, remote.Transfer())
    try:
        _, names = parse_vital(stream, [_NO_SUCH_TRACK], tracks_only=True)
    finally:
        stream.close()
    return names, (path, identity)


# A name no track has: vitaldb is asked about every track of the file and keeps none.
_NO_SUCH_TRACK = "\x00/no such track"


def load_case(source: Source, case_id: int, fs: spec.FeatureSpec = spec.DEFAULT_SPEC,
              located: Optional[tuple[str, FileIdentity]] = None) -> RawCase:
    """Reads one case's numeric source tracks (those of `fs`) on the 1 s grid,
    from its file's stream (a remote file is parsed as it arrives; `located`:
    its (path, identity) if already found).

    Raises CaseError for a missing, corrupt or empty file, one with none of
    the wanted tracks, or a download that failed.
    """
    t0 = time.perf_counter()
    transfer = remote.Transfer()
    path, identity, stream = _open_case(source, case_id, located, transfer)
    tracks = fs.source_tracks
    hasher = FileHasher()
    t1 = time.perf_counter()
    try:
        vf, names = parse_vital(stream, tracks, hasher)
    finally:
        stream.close()
    parse = time.perf_counter() - t1
    identity = identity.read(**stream.finish_identity(hasher))
    # Only exact names: vitaldb matches by suffix and could hand us another track.
    found = [t for t in tracks if t in vf.trks]
    if not found:
        check_signature(stream.head)
        raise CaseError("no_tracks", "none of the wanted numeric tracks is in the file; " + describe_tracks(names))
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
    return RawCase(case_id, path, raw, found, StepSeconds(time.perf_counter() - t0, parse), input=identity)
