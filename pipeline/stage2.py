"""Stage 2 (finalize): committed cases -> final split files, then verify.

    PlanShards (driver, from the markers) -> Create -> Reshuffle -> WriteShards

Stage 2 only moves bytes. Stage 1 compressed each case once, at the final
level, as gzip members of up to 32 windows; a shard is a seeded interleave of
the members of its cases, copied as they are, so windows of different
patients alternate in blocks of at most 32. Concatenated gzip members are
one valid GZIP TFRecord file (TensorFlow reads it through), named like
WriteToTFRecord's output: `<split>/<split>-SSSSS-of-NNNNN.tfrecord.gz`.

Why not `beam.io.WriteToTFRecord` after a record-level Reshuffle: on the
DirectRunner every GroupByKey (Reshuffle, and WriteToTFRecord's fixed
sharding) holds all its elements in memory, i.e. every window of every case,
tens of GB for VitalDB; and it would decompress and compress everything a
second time. Here only the shard plans are shuffled, each shard streams, and
the result is deterministic: finalize can be rerun at any time and gives
byte-identical files.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import s3, storage
from pipeline.contracts import DoneMarker, PlannedCase, ShardPlan, StageJob
from transforms import encode
from transforms.beam import NAMESPACE

_LOG = logging.getLogger(__name__)
WINDOWS_PER_SHARD = 20000  # ~50 MB compressed per shard with the defaults


def _order_key(seed: int, case_id: int) -> str:
    return hashlib.sha256(f"shard:{seed}:{case_id}".encode()).hexdigest()


def plan_shards(output: str, done: dict[int, DoneMarker], splits: tuple[str, ...], num_shards: int = 0,
                seed: int = 42) -> list[ShardPlan]:
    """Assigns every committed case with windows to one shard of its split.

    num_shards 0 = automatic (about WINDOWS_PER_SHARD windows per shard).
    Cases are placed in a seeded hash order onto the least-filled shard, so
    shards are balanced and the plan depends only on the markers.
    """
    plans = []
    for split in splits:
        # Object paths come from the layout, not the marker: a copied output works.
        cases = sorted((PlannedCase(cid, m.windows, storage.case_object(output, split, cid), m.members)
                        for cid, m in done.items() if m.split == split and m.has_windows),
                       key=lambda c: _order_key(seed, c.case_id))
        if not cases:
            continue
        total = sum(c.windows for c in cases)
        n = num_shards or max(1, math.ceil(total / WINDOWS_PER_SHARD))
        n = min(n, len(cases))
        bins: list[list[PlannedCase]] = [[] for _ in range(n)]
        fill = [0] * n
        for c in cases:
            k = int(np.argmin(fill))
            bins[k].append(c)
            fill[k] += c.windows
        plans += [ShardPlan(split, i, n, tuple(sorted(b, key=lambda c: c.case_id))) for i, b in enumerate(bins)]
    return plans


def interleave_order(plan: ShardPlan, seed: int) -> np.ndarray:
    """Which case supplies each next member: a seeded uniform interleave."""
    owners = np.repeat(np.arange(len(plan.cases)), [len(c.members) for c in plan.cases])
    digest = hashlib.sha256(f"{seed}:{plan.split}:{plan.index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.permutation(owners)


def write_shard(output: str, plan: ShardPlan, seed: int) -> dict:
    """Copies the members of the plan's cases, interleaved, into the shard
    (a temporary object, renamed when complete)."""
    final = storage.shard_path(output, plan.split, plan.index, plan.count)
    tmp = storage.shard_tmp_path(output, plan.split, plan.index, plan.count)
    for p in (tmp, final):
        if storage.is_local(p):
            os.makedirs(os.path.dirname(p), exist_ok=True)
    s3.ensure_pool_size(len(plan.cases) + 8)  # one open stream per case object (see s3.ensure_pool_size)
    readers = [FileSystems.open(c.path, compression_type=CompressionTypes.UNCOMPRESSED) for c in plan.cases]
    nxt = [0] * len(plan.cases)
    records = 0
    try:
        fh = FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED)
        for owner in interleave_order(plan, seed):
            case = plan.cases[owner]
            member = case.members[nxt[owner]]
            nxt[owner] += 1
            data = readers[owner].read(member.nbytes)
            if len(data) != member.nbytes or data[:2] != b"\x1f\x8b":
                raise IOError(f"case object {case.path} does not match its marker")
            fh.write(data)
            records += member.records
        for r, c in zip(readers, plan.cases):
            if r.read(1):
                raise IOError(f"case object {c.path} is longer than its marker says")
        fh.close()
    finally:
        for r in readers:
            r.close()
    FileSystems.rename([tmp], [final])
    return {"split": plan.split, "path": final, "records": records}


class WriteShard(beam.DoFn):
    def __init__(self, output: str, seed: int):
        self._out, self._seed = output, seed
        self._shards = Metrics.counter(NAMESPACE, "shards_written")
        self._records = Metrics.counter(NAMESPACE, "records_finalized")
        self._us = Metrics.counter(NAMESPACE, "shard_write_us")

    def setup(self):
        s3.log_retries()
        s3.share_boto3_clients()

    def process(self, plan: ShardPlan):
        t = time.perf_counter()
        res = write_shard(self._out, plan, self._seed)
        seconds = time.perf_counter() - t
        # Progress on stdout (local workers share it; remote runners log it).
        print(f"stage 2: wrote {res['path']} ({res['records']} examples, {seconds:.2f} s)", flush=True)
        self._us.inc(int(round(seconds * 1e6)))
        self._shards.inc()
        self._records.inc(res["records"])
        yield res


def build_stage2(pipeline: beam.Pipeline, job: StageJob) -> beam.Pipeline:
    """Adds stage 2 of `job` (its shard plans) to `pipeline` (unrun) and returns it."""
    _ = (pipeline
         | "PlanShards" >> beam.Create(job.plans, reshuffle=False)
         | "SpreadShards" >> beam.Reshuffle()
         | "WriteShards" >> beam.ParDo(WriteShard(job.output, job.settings.split_seed)))
    return pipeline


def remove_stale_shards(output: str, plans: list[ShardPlan], splits: tuple[str, ...]) -> list[str]:
    """Deletes split files that the current plan did not write (an earlier
    finalize with another shard count)."""
    keep = {storage.shard_path(output, p.split, p.index, p.count) for p in plans}
    stale = [f for s in splits for f in storage.list_files(storage.split_files_glob(output, s)) if f not in keep]
    storage.delete(stale)
    return stale


# ---- damaged case objects ------------------------------------------------------

DAMAGED = "damaged_case_object"


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
            n = sum(1 for _ in encode.iter_records(fh))
    except (encode.CorruptRecordError, OSError) as e:
        return f"case object {path} is damaged: {e}"
    return None if n == windows else f"case object {path} holds {n} records, its marker says {windows}"


# ---- verification -----------------------------------------------------------

def read_shard_ids(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(case_id, window_start) of every record of a file, CRCs checked."""
    dec = encode.examples_decoder({"case_id": "int", "window_start": "int"})
    cids, starts = [], []
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        batch = []
        for rec in encode.iter_records(fh):
            batch.append(rec)
            if len(batch) >= 2048:
                rb = dec.DecodeBatch(batch)
                cids.append(rb.column("case_id").flatten().to_numpy())
                starts.append(rb.column("window_start").flatten().to_numpy())
                batch = []
        if batch:
            rb = dec.DecodeBatch(batch)
            cids.append(rb.column("case_id").flatten().to_numpy())
            starts.append(rb.column("window_start").flatten().to_numpy())
    if not cids:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(cids), np.concatenate(starts)


def verify_output(output: str, done: dict[int, DoneMarker], splits: tuple[str, ...], workers: int = 4) -> dict:
    """Reads every split file back and compares with the markers: examples per
    split and per case, no duplicate (case, window_start), no case and no
    patient (the markers' split keys) in two splits. Returns {"ok",
    "problems", "splits": {name: {...}}, "damaged_cases"}."""
    problems: list[str] = []
    files = {s: storage.list_files(storage.split_files_glob(output, s)) for s in splits}
    jobs = [(s, f) for s in splits for f in files[s]]

    def read(job):
        try:
            return job, read_shard_ids(job[1]), None
        except (encode.CorruptRecordError, OSError, ValueError) as e:
            return job, None, f"{job[1]}: damaged, unreadable: {e}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(read, jobs))
    # A damaged split file: find the damaged case object behind it, if any
    # (read through only the cases of the splits that failed to read).
    damaged: dict[int, str] = {}
    bad_splits = {job[0] for job, _, err in results if err}
    suspects = [(cid, m) for cid, m in sorted(done.items()) if m.split in bad_splits and m.has_windows]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for (cid, m), err in zip(suspects, pool.map(
                lambda cm: read_case_object(storage.case_object(output, cm[1].split, cm[0]), cm[1].windows), suspects)):
            if err:
                damaged[cid] = err
    per_split: dict[str, dict] = {}
    seen_split: dict[int, str] = {}
    patient_split: dict[str, tuple[str, int]] = {}  # split key -> (split, a case of it there)
    for s in splits:
        expected = {cid: m.windows for cid, m in done.items() if m.split == s and m.has_windows}
        parts = [r for r in results if r[0][0] == s]
        for _, _, err in parts:
            if err:
                problems.append(err)
        ids = [r[1] for r in parts if r[1] is not None]
        cid = np.concatenate([i[0] for i in ids]) if ids else np.empty(0, np.int64)
        ws = np.concatenate([i[1] for i in ids]) if ids else np.empty(0, np.int64)
        got_cases, got_counts = np.unique(cid, return_counts=True)
        got = dict(zip(got_cases.tolist(), got_counts.tolist()))
        if got != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            wrong = sorted(c for c in set(got) & set(expected) if got[c] != expected[c])
            problems.append(f"{s}: examples do not match the markers (cases missing {missing[:10]}, "
                            f"unexpected {extra[:10]}, wrong counts {wrong[:10]})")
        pairs = cid * (1 << 32) + ws
        if np.unique(pairs).size != pairs.size:
            problems.append(f"{s}: duplicate (case_id, window_start) examples")
        patients = set()
        for c in got:
            if c in seen_split and seen_split[c] != s:
                problems.append(f"case {c} is in both {seen_split[c]} and {s}")
            seen_split[c] = s
            key = done[c].patient if c in done else str(c)
            patients.add(key)
            other = patient_split.setdefault(key, (s, c))
            if other[0] != s:
                problems.append(f"patient {key} is in both {other[0]} (case {other[1]}) and {s} (case {c})")
        per_split[s] = {"files": len(files[s]), "examples": int(cid.size), "cases": len(got),
                        "patients": len(patients),
                        "expected_examples": int(sum(expected.values())), "expected_cases": len(expected)}
    for cid, err in damaged.items():
        problems.append(f"case {cid}: {err} (the split file above holds its damage)")
    return {"ok": not problems, "problems": problems, "splits": per_split, "damaged_cases": damaged}
