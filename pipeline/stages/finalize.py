"""Stage 2 end to end: from the markers to verified split files and metadata.

    Finalize(record, runner, request).run()

in named phases, in this order, once (like Beam's FileBasedSink, whose
pre_finalize / finalize_write own the sink's lifecycle):

    check      the case objects against their markers (sizes, one listing)
    plan       the shards (pipeline.stages.stage2.plan_shards)
    write      them, as a Beam stage through the runner
    clean up   split files no plan wrote (another shard count), temporary objects
    verify     read everything back (pipeline.stages.verify)
    record     the metadata, schema, config.yaml and report (RunRecord.write)

A case whose object turns out damaged, found by the check or only by
reading, is demoted to failed (`damaged_case_object`) in one place, so a rerun
of stage 1 recomputes it; the split files are written from the others.
Finalize only moves bytes and can be run again at any time: the same markers
give byte-identical files.
"""
from __future__ import annotations

import logging
import os
import time

from pipeline.options import RunRequest
from pipeline.output import storage
from pipeline.output.contracts import DoneMarker, ShardPlan, Stage2Job, Status
from pipeline.output.metadata import RunRecord
from pipeline.output.records import Metadata
from pipeline.run.runtime import Interrupted, StageRunner, run_with, stage_job
from pipeline.stages import stage2, verify
from pipeline.stages.verify import DAMAGED, Verification

_LOG = logging.getLogger("master_poc")


class Finalize:
    def __init__(self, record: RunRecord, runner: StageRunner, req: RunRequest):
        self.record, self.runner, self.req = record, runner, req
        self.output = record.output

    def run(self) -> Metadata:
        """The phases in order; returns the metadata written."""
        t = time.time()
        done = storage.read_selected_done(self.output)  # the cases the cohort keeps
        damaged = self.check(done)
        plans = self.plan(done)
        self.write(plans)
        self.clean_up(plans)
        t_verify = time.time()
        self.record.timings["stage2_s"] = round(t_verify - t, 3)
        verification = self.verify(done, damaged)
        self.record.timings["verify_s"] = round(time.time() - t_verify, 3)
        status = Status.COMPLETE if verification.ok else Status.VERIFICATION_FAILED
        return self.record.write(status, verification, done)

    def check(self, done: dict[int, DoneMarker]) -> dict[int, str]:
        """A case object that is not what its marker says (missing, truncated)
        is named and its case demoted, before any shard is written."""
        damaged = verify.check_case_objects(self.output, done, self.record.settings.split_names)
        self.demote(done, damaged)
        return damaged

    def plan(self, done: dict[int, DoneMarker]) -> list[ShardPlan]:
        return stage2.plan_shards(self.output, done, self.record.settings.split_names, self.req.options.num_shards,
                                  self.record.settings.split_seed)

    def write(self, plans: list[ShardPlan]) -> None:
        if plans:
            job = stage_job(self.req, Stage2Job, plans=plans)
            counts = run_with(self.runner, job)
            self.record.timings["stage2_shard_write_s"] = round(counts.get("shard_write_us", 0) / 1e6, 6)

    def clean_up(self, plans: list[ShardPlan]) -> None:
        stage2.remove_stale_shards(self.output, plans, self.record.settings.split_names)
        storage.delete(storage.list_files(storage.tmp_glob(self.output)))
        if self.runner.stopping:
            raise Interrupted()

    def verify(self, done: dict[int, DoneMarker], damaged_before: dict[int, str]) -> Verification:
        """Everything read back. Damage found only by reading (a changed byte)
        names the split file holding it, and its case is demoted so the next
        finalize leaves it out; damage the check found is a problem too."""
        v = verify.verify_output(self.output, done, self.record.settings.split_names, os.cpu_count() or 1,
                                 storage.read_excluded(self.output))
        self.demote(done, v.damaged_cases)
        return v.with_problems([f"case {c}: {d} (case demoted to failed: rerun to recompute it)"
                                for c, d in damaged_before.items()])

    def demote(self, done: dict[int, DoneMarker], damaged: dict[int, str]) -> None:
        for cid, detail in damaged.items():
            _LOG.error("case %s: %s; the case is now failed (%s): rerun to recompute it", cid, detail, DAMAGED)
            storage.demote(self.output, cid, DAMAGED, detail)
            done.pop(cid, None)
