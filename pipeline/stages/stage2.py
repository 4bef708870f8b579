"""Stage 2: committed cases -> final split files (pipeline.stages.finalize runs it,
pipeline.stages.verify checks what it wrote).

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
import math
import time
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.io import s3
from pipeline.output import storage
from pipeline.output.contracts import DoneMarker, PlannedCase, ShardPlan, Stage2Job
from pipeline.stages.dofns import NAMESPACE

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


@dataclass(frozen=True)
class ShardWritten:
    """A split file written from its plan: where, and how many examples."""

    split: str
    path: str
    records: int


def write_shard(output: str, plan: ShardPlan, seed: int) -> ShardWritten:
    """Copies the members of the plan's cases, interleaved, into the shard
    (a temporary object, renamed when complete)."""
    final = storage.shard_path(output, plan.split, plan.index, plan.count)
    tmp = storage.shard_tmp_path(output, plan.split, plan.index, plan.count)
    for p in (tmp, final):
        storage.ensure_parent(p)
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
    return ShardWritten(plan.split, final, records)


class WriteShard(beam.DoFn):
    def __init__(self, output: str, seed: int):
        self._out, self._seed = output, seed
        self._shards = Metrics.counter(NAMESPACE, "shards_written")
        self._records = Metrics.counter(NAMESPACE, "records_finalized")
        self._us = Metrics.counter(NAMESPACE, "shard_write_us")

    def setup(self):
        s3.prepare_process()

    def process(self, plan: ShardPlan):
        t = time.perf_counter()
        res = write_shard(self._out, plan, self._seed)
        seconds = time.perf_counter() - t
        # Progress on stdout (local workers share it; remote runners log it).
        print(f"stage 2: wrote {res.path} ({res.records} examples, {seconds:.2f} s)", flush=True)
        self._us.inc(int(round(seconds * 1e6)))
        self._shards.inc()
        self._records.inc(res.records)
        yield res


def build_stage2(pipeline: beam.Pipeline, job: Stage2Job) -> beam.Pipeline:
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
