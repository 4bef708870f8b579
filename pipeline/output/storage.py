"""The output layout and the commit protocol (the durable checkpoint).

    <out>/cases/_settings.json              settings fingerprint of this output
    <out>/cases/<split>/<case>.tfrecord.gz  one case's examples (GZIP TFRecord)
    <out>/cases/_done/<case>.json           marker: the case is committed (or too short)
    <out>/cases/_failed/<case>.json         marker: the case failed, with the reason
    <out>/cases/_excluded/<case>.json       marker: the cohort's criteria leave the case out, and which
    <out>/cases/_tmp/...                    objects being written (never counted)
    <out>/<split>/<split>-SSSSS-of-NNNNN.tfrecord.gz   stage 2 output
    <out>/preprocessing_metadata.json, <out>/schema.pbtxt

An object appears under its final name only complete (written to `_tmp/`,
closed, then renamed); its marker is written after it. Stage 2 reads only
cases that have a done marker, so an object without one is never counted and
is overwritten when its case is processed again (names are deterministic).
All I/O goes through Beam's FileSystems: local paths, s3:// and gs:// alike.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.io.sources import is_local  # one helper for the sources and the pipeline
from pipeline.output.contracts import DoneMarker, FailedMarker
from pipeline.output.names import (
    CONFIG_NAME,
    METADATA_NAME,
    SCHEMA_NAME,
    SHARD_NAME,
    STATISTICS_NAME,
    SUFFIX,
    TABLE1_NAME,
    split_files_glob,  # noqa: F401 (storage hands out every path of an output)
)
from transforms.cohort import Exclusion

DONE, FAILED, EXCLUDED = "_done", "_failed", "_excluded"


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


# ---- every path of an output -------------------------------------------------------

def cases_dir(out: str) -> str:
    return join(out, "cases")


def tmp_dir(out: str) -> str:
    """Objects being written: never counted, removed by finalize."""
    return join(out, "cases", "_tmp")


def tmp_glob(out: str) -> str:
    return join(tmp_dir(out), "*")


def case_object(out: str, split: str, case_id: int) -> str:
    return join(out, "cases", split, f"{case_id}{SUFFIX}")


def case_objects_glob(out: str, split: str) -> str:
    return join(out, "cases", split, "*" + SUFFIX)


def marker_path(out: str, kind: str, case_id: int) -> str:
    return join(out, "cases", kind, f"{case_id}.json")


def markers_glob(out: str, kind: str) -> str:
    return join(out, "cases", kind, "*.json")


def cohort_path(out: str) -> str:
    """The criteria of the last run on this output (what finalize alone applies)."""
    return join(out, "cases", "_cohort.json")


def settings_path(out: str) -> str:
    return join(out, "cases", "_settings.json")


def split_dir(out: str, split: str) -> str:
    return join(out, split)


def shard_path(out: str, split: str, index: int, count: int) -> str:
    return join(out, split, SHARD_NAME.format(split=split, index=index, count=count))


def shard_tmp_path(out: str, split: str, index: int, count: int) -> str:
    return join(tmp_dir(out), shard_path(out, split, index, count).rsplit("/", 1)[-1])


def metadata_path(out: str) -> str:
    return join(out, METADATA_NAME)


def statistics_path(out: str) -> str:
    """The statistics of every split (also in the metadata), for a reader who wants only them."""
    return join(out, STATISTICS_NAME)


def table1_path(out: str) -> str:
    """Table 1 per split, as CSV (also in the metadata, as numbers)."""
    return join(out, TABLE1_NAME)


def schema_path(out: str) -> str:
    return join(out, SCHEMA_NAME)


def config_path(out: str) -> str:
    """The run's effective configuration, a --config file that rebuilds the output."""
    return join(out, CONFIG_NAME)


def report_path(out: str, name: str = "index.html") -> str:
    """The quality report: index.html and quality.json."""
    return join(out, "report", name)


def output_parts(out: str, splits: tuple[str, ...]) -> list[str]:
    """What --overwrite removes: the checkpoint, the split folders, the report."""
    return [cases_dir(out), join(out, "report")] + [split_dir(out, s) for s in splits]


def ensure_parent(path: str) -> None:
    """A local file's folder (object stores have none to make)."""
    if is_local(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


# Below one multipart part (Beam's S3 writer uploads 5 MiB parts), an object
# store write happens entirely in close(): the object appears whole or not at
# all, so no temporary object and rename (copy + delete) are needed.
SINGLE_PART_MAX = 5 * 1024 * 1024


def write_atomic(path: str, data: bytes, tmp_root: Optional[str] = None) -> None:
    """Makes `data` visible under `path` only complete.

    Local: a temporary file in the same folder, then os.rename. Object stores:
    small objects are written directly (visible only when close() completes
    the upload); larger ones go to a temporary object that is renamed after a
    successful close, because a writer closed after a failed part upload would
    publish a truncated object. A crash leaves at most a temporary object.
    """
    parent, name = path.rsplit("/", 1)
    if not is_local(path) and len(data) < SINGLE_PART_MAX:
        fh = FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
        fh.write(data)  # buffered: no network until close()
        fh.close()
        return
    if tmp_root:
        tmp = join(tmp_root, f"{uuid.uuid4().hex}-{name}")
    elif is_local(path):  # same folder: os.rename is atomic there; hidden, never matched
        tmp = join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    else:
        tmp = join(parent, "_tmp", f"{uuid.uuid4().hex}-{name}")
    ensure_parent(tmp)
    ensure_parent(path)
    fh = FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED)
    fh.write(data)
    fh.close()  # only a successful close makes an S3 upload visible
    FileSystems.rename([tmp], [path])


def write_json(path: str, obj, tmp_root: Optional[str] = None, compact: bool = False) -> None:
    """JSON for people (indented, keys sorted), or compact for machines (markers)."""
    text = (json.dumps(obj, separators=(",", ":"), default=_json_default) if compact
            else json.dumps(obj, indent=1, sort_keys=True, default=_json_default))
    write_atomic(path, text.encode(), tmp_root)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON: {type(o)}")


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        return fh.read()


def read_json(path: str):
    return json.loads(read_bytes(path))


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def match(pattern: str) -> list:
    """The metadata (path, size) of the files matching a glob; [] when nothing
    (or no folder) matches: the one place that tells "no files" from a failure."""
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # BeamIOError when the folder does not exist yet
        if "No files found" in str(e) or "not found" in str(e).lower() or isinstance(e, FileNotFoundError):
            return []
        raise


def list_files(pattern: str) -> list[str]:
    """Paths matching a glob; [] when nothing (or no folder) matches."""
    return sorted(m.path for m in match(pattern))


def list_sizes(pattern: str) -> dict[str, int]:
    """{path: size in bytes} of the files matching a glob (one listing)."""
    return {m.path: m.size_in_bytes for m in match(pattern)}


def marker_ids(out: str, kind: str) -> set[int]:
    ids = set()
    for p in list_files(markers_glob(out, kind)):
        stem = p.rsplit("/", 1)[-1][:-5]
        if stem.isdigit():
            ids.add(int(stem))
    return ids


def _read_markers(out: str, kind: str, ids: Optional[Iterable[int]], parse) -> dict:
    """Reads markers in parallel (S3 GETs are latency-bound)."""
    ids = sorted(marker_ids(out, kind) if ids is None else ids)
    with ThreadPoolExecutor(max_workers=16) as pool:
        docs = list(pool.map(lambda i: parse(read_json(marker_path(out, kind, i))), ids))
    return dict(zip(ids, docs))


def read_done(out: str, ids: Optional[Iterable[int]] = None) -> dict[int, DoneMarker]:
    return _read_markers(out, DONE, ids, DoneMarker.from_json)


def read_failed(out: str, ids: Optional[Iterable[int]] = None) -> dict[int, FailedMarker]:
    return _read_markers(out, FAILED, ids, FailedMarker.from_json)


def read_excluded(out: str, ids: Optional[Iterable[int]] = None) -> dict[int, Exclusion]:
    return _read_markers(out, EXCLUDED, ids, Exclusion.from_json)


def read_selected_done(out: str) -> dict[int, DoneMarker]:
    """The committed cases the cohort keeps: done markers without an excluded
    marker (an excluded case keeps its done marker and object, so selecting
    it again costs nothing); what stage 2 writes and verify reads."""
    excluded = marker_ids(out, EXCLUDED)
    return read_done(out, sorted(marker_ids(out, DONE) - excluded))


def write_excluded(out: str, exclusions: Iterable[Exclusion]) -> None:
    """Excluded markers, in parallel (one small PUT each on an object store)."""
    items = list(exclusions)
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda e: write_json(marker_path(out, EXCLUDED, e.case_id), e.to_json(), tmp_dir(out)), items))


def delete_excluded(out: str, ids: Iterable[int]) -> None:
    """The excluded markers of these cases, where they have one (they are selected now)."""
    present = marker_ids(out, EXCLUDED)
    delete([marker_path(out, EXCLUDED, i) for i in ids if i in present])


def write_done(out: str, marker: DoneMarker) -> None:
    # compact: a marker carries the case's statistics (~50 KB indented, ~18 KB compact)
    write_json(marker_path(out, DONE, marker.case_id), marker.to_json(), tmp_dir(out), compact=True)
    # A failure marker of an earlier try is stale now.
    delete([marker_path(out, FAILED, marker.case_id)])


def write_failed(out: str, marker: FailedMarker) -> None:
    write_json(marker_path(out, FAILED, marker.case_id), marker.to_json(), tmp_dir(out))


def demote(out: str, case_id: int, reason: str, detail: str) -> None:
    """A committed case turned out to be unusable (its object is damaged):
    its done marker becomes a failed marker, so the summary lists it and a
    rerun of stage 1 recomputes it. The failed marker is written first: a
    kill in between leaves the case done, and the next finalize finds the
    damage again."""
    write_failed(out, FailedMarker(case_id, reason, detail))
    delete([marker_path(out, DONE, case_id)])


def delete(paths: list[str]) -> None:
    paths = [p for p in paths if FileSystems.exists(p)]
    if paths:
        FileSystems.delete(paths)


def delete_tree(path: str) -> None:
    """Removes a folder/prefix and everything under it (for --overwrite)."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        storage_files = list_files(join(path, "**"))
        if storage_files:
            FileSystems.delete(storage_files)
