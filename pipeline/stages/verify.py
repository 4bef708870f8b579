"""Verification: every split file read back and compared with the markers;
and the damage checks of case objects that finalize makes before and after.

    check_case_objects   sizes against the markers (one listing per split, no reads)
    verify_output        every record read (CRCs checked): examples per split and
                         per case, no duplicate window, no case and no patient in
                         two splits; a damaged split file's case objects read
                         through to name the damaged case
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.output import storage
from pipeline.output.contracts import DoneMarker, units_in_two_splits
from transforms import encode, tfrecord

DAMAGED = "damaged_case_object"  # the failure reason of a committed case whose object is damaged


@dataclass(frozen=True)
class SplitCheck:
    """One split as read back, beside what its markers say."""

    files: int
    examples: int
    cases: int
    patients: int
    expected_examples: int
    expected_cases: int


@dataclass(frozen=True)
class Verification:
    """What reading an output back found; `ok` when nothing is wrong."""

    problems: tuple[str, ...] = ()
    splits: dict = field(default_factory=dict)  # split name -> SplitCheck
    damaged_cases: dict = field(default_factory=dict)  # case id -> what is wrong with its object
    excluded: int = 0  # cases the cohort's criteria leave out (none of their examples may be in a split)

    @property
    def ok(self) -> bool:
        return not self.problems

    def with_problems(self, more: list[str]) -> "Verification":
        return dataclasses.replace(self, problems=self.problems + tuple(more))

    def as_json(self) -> dict:
        return {"ok": self.ok, "problems": list(self.problems),
                "splits": {s: dataclasses.asdict(c) for s, c in self.splits.items()},
                "damaged_cases": dict(self.damaged_cases), "excluded": self.excluded}


def check_case_objects(output: str, done: dict[int, DoneMarker], splits: tuple[str, ...]) -> dict[int, str]:
    """Committed cases whose object is missing or not the size its marker
    says (truncated, replaced, appended to): {case id: what is wrong}. One
    listing per split, no reads."""
    sizes: dict[str, int] = {}
    for s in splits:
        sizes.update(storage.list_sizes(storage.case_objects_glob(output, s)))
    bad = {}
    for cid, m in sorted(done.items()):
        if not m.has_windows:
            continue
        path = storage.case_object(output, m.split, cid)
        want, got = sum(x.nbytes for x in m.members), sizes.get(path)
        if got is None:
            bad[cid] = f"case object {path} is missing"
        elif got != want:
            bad[cid] = f"case object {path} has {got} bytes, its marker says {want}"
    return bad


def read_case_object(path: str, windows: int) -> Optional[str]:
    """Reads a case object through, every CRC checked: None if it holds its
    `windows` records, else what is wrong."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            n = sum(1 for _ in tfrecord.iter_records(fh))
    except (tfrecord.CorruptRecordError, OSError) as e:
        return f"case object {path} is damaged: {e}"
    return None if n == windows else f"case object {path} holds {n} records, its marker says {windows}"


def read_shard_ids(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(case_id, window_start) of every record of a file, CRCs checked."""
    dec = encode.examples_decoder({"case_id": "int", "window_start": "int"})
    cids, starts = [], []

    def decode(batch):
        rb = dec.DecodeBatch(batch)
        cids.append(rb.column("case_id").flatten().to_numpy())
        starts.append(rb.column("window_start").flatten().to_numpy())

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        batch = []
        for rec in tfrecord.iter_records(fh):
            batch.append(rec)
            if len(batch) >= 2048:
                decode(batch)
                batch = []
        if batch:
            decode(batch)
    if not cids:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(cids), np.concatenate(starts)


def _read_splits(output: str, files: dict[str, list[str]], workers: int) -> list:
    """[((split, file), (case ids, window starts) or None, error or None)] of every split file."""
    def read(job):
        try:
            return job, read_shard_ids(job[1]), None
        except (tfrecord.CorruptRecordError, OSError, ValueError) as e:
            return job, None, f"{job[1]}: damaged, unreadable: {e}"
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(read, [(s, f) for s, fs in files.items() for f in fs]))


def _damaged_cases(output: str, done: dict[int, DoneMarker], bad_splits: set, workers: int) -> dict[int, str]:
    """The damaged case objects behind damaged split files (only the cases of those splits are read)."""
    suspects = [(cid, m) for cid, m in sorted(done.items()) if m.split in bad_splits and m.has_windows]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = pool.map(lambda cm: read_case_object(storage.case_object(output, cm[1].split, cm[0]),
                                                      cm[1].windows), suspects)
        return {cid: err for (cid, _), err in zip(suspects, errors) if err}


def _check_split(s: str, parts: list, done: dict[int, DoneMarker], excluded: dict, problems: list) -> tuple:
    """One split's files against its markers; (its SplitCheck's counts, {case: examples} found)."""
    expected = {cid: m.windows for cid, m in done.items() if m.split == s and m.has_windows}
    problems += [err for _, _, err in parts if err]
    ids = [r[1] for r in parts if r[1] is not None]
    cid = np.concatenate([i[0] for i in ids]) if ids else np.empty(0, np.int64)
    ws = np.concatenate([i[1] for i in ids]) if ids else np.empty(0, np.int64)
    got_cases, got_counts = np.unique(cid, return_counts=True)
    got = dict(zip(got_cases.tolist(), got_counts.tolist()))
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(c for c in set(got) & set(expected) if got[c] != expected[c])
        problems.append(f"{s}: examples do not match the markers (cases missing {missing[:10]}, "
                        f"unexpected {extra[:10]}, wrong counts {wrong[:10]})")
    for c in sorted(set(got) & set(excluded)):
        problems.append(f"{s}: case {c} is excluded by the cohort ({excluded[c].criterion}) but has "
                        f"{got[c]} examples here")
    pairs = cid * (1 << 32) + ws
    if np.unique(pairs).size != pairs.size:
        problems.append(f"{s}: duplicate (case_id, window_start) examples")
    return (int(cid.size), int(sum(expected.values())), len(expected)), got


def verify_output(output: str, done: dict[int, DoneMarker], splits: tuple[str, ...], workers: int = 4,
                  excluded: Optional[dict] = None) -> Verification:
    """Reads every split file back and compares with the markers: examples per
    split and per case, no duplicate (case, window_start), no case and no
    patient (the markers' split units) in two splits, no case that the
    cohort's criteria exclude (`excluded`: {case id: Exclusion})."""
    excluded = excluded or {}
    problems: list[str] = []
    files = {s: storage.list_files(storage.split_files_glob(output, s)) for s in splits}
    results = _read_splits(output, files, workers)
    damaged = _damaged_cases(output, done, {job[0] for job, _, err in results if err}, workers)
    per_split: dict[str, SplitCheck] = {}
    placed, seen_split = [], {}
    for s in splits:
        (examples, expected_examples, expected_cases), got = _check_split(
            s, [r for r in results if r[0][0] == s], done, excluded, problems)
        for c in got:
            if c in seen_split and seen_split[c] != s:
                problems.append(f"case {c} is in both {seen_split[c]} and {s}")
            seen_split[c] = s
        units = {done[c].split_unit if c in done else str(c): c for c in got}
        placed += [(u, s, c) for u, c in units.items()]
        per_split[s] = SplitCheck(files=len(files[s]), examples=examples, cases=len(got), patients=len(units),
                                  expected_examples=expected_examples, expected_cases=expected_cases)
    for unit, where in units_in_two_splits(placed).items():
        (s1, c1), (s2, c2) = where[0], where[1]
        problems.append(f"patient {unit} is in both {s1} (case {c1}) and {s2} (case {c2})")
    problems += [f"case {cid}: {err} (the split file above holds its damage)" for cid, err in damaged.items()]
    return Verification(tuple(problems), per_split, damaged, len(excluded))
