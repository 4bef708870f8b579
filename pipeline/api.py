"""The run API: `run(RunRequest) -> RunResult`.

The command line (pipeline.cli), the SageMaker entry point (launch.entrypoint)
and the tests all call this; it holds no state between calls.

    run      stage 1 (cases -> committed case objects and markers), then
             stage 2 (pipeline.stages.finalize: split files, verification, metadata,
             schema, report); with a share I/N: stage 1 on this share, and
             share 1 waits for every marker and finalizes
    finalize stage 2 alone, from the markers (idempotent, byte-identical)
    verify   read every split file back and compare with the markers

Each command is one function here; the run's record (pipeline.output.metadata.RunRecord)
writes what it did, the stages run through a StageRunner (pipeline.run.runtime).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional, TextIO

import pandas as pd

from pipeline.io import s3, sources
from pipeline.io.clinical import ClinicalTable, ClinicalTableError, TableFormat, read_clinical
from pipeline.io.identity import TableIdentity
from pipeline.io.sources import Source, SourceError
from pipeline.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    OptionError,
    RunRequest,
    cohort_flags,
    finish_command,
    settings_flags,
)
from pipeline.output import cohort as cohort_run
from pipeline.output import storage
from pipeline.output.contracts import FailedMarker, Stage1Job, Status
from pipeline.output.metadata import RunRecord, fingerprint
from pipeline.output.records import Metadata
from pipeline.run import coordination
from pipeline.run.progress import Progress
from pipeline.run.runtime import InProcess, Interrupted, StageFailed, StageRunner, run_with, stage_job
from pipeline.run.supervisor import Supervisor
from pipeline.stages.finalize import Finalize
from pipeline.stages.verify import Verification, verify_output
from transforms import cohort
from transforms.settings import Settings

_LOG = logging.getLogger("master_poc")


@dataclass
class Stage1Report:
    """Stage 1 of this process's cases, when no finalize follows here."""

    requested: list[int]
    done: list[int]
    failed: dict[int, FailedMarker]
    excluded: list[int] = field(default_factory=list)  # by the cohort's criteria, decided in stage 1

    @property
    def complete(self) -> bool:
        return len(self.done) + len(self.failed) + len(self.excluded) == len(self.requested)


@dataclass
class RunResult:
    exit_code: int
    status: Status
    message: str = ""  # why it did not succeed, and what to do
    metadata: Optional[Metadata] = None  # what preprocessing_metadata.json was written from
    counters: dict = field(default_factory=dict)  # stage 1's Beam counters (cases_skipped, ...)
    elapsed_s: float = 0.0
    stage1: Optional[Stage1Report] = None
    verification: Optional[Verification] = None  # the verify command's
    stopped_by: Optional[str] = None  # the signal's name when interrupted


class Refused(Exception):
    """Bad input found before any work: exit 2, nothing written."""


def guard_output(output: str, settings: Settings, overwrite: bool) -> None:
    """An output keeps one fingerprint (settings, contract and format versions): refuse a silent mix."""
    path = storage.settings_path(output)
    new = fingerprint(settings)
    if storage.exists(path):
        # A setting added after the output was made reads as its default there.
        old = dict(fingerprint(Settings()), **storage.read_json(path))
        if old == new:
            return
        old_names = Settings.from_json(old).split_names
        if not overwrite:
            diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
            raise Refused(f"{output} was made with other settings {diff} (old, new); use another --output, "
                          "the same settings, or --overwrite to start over")
        _LOG.warning("--overwrite: removing %s made with other settings", output)
        for part in storage.output_parts(output, tuple(dict.fromkeys(old_names + settings.split_names))):
            storage.delete_tree(part)
        storage.delete([storage.metadata_path(output), storage.schema_path(output), storage.config_path(output),
                        storage.statistics_path(output), storage.table1_path(output)])
    storage.write_json(path, new)


def load_settings(output: str) -> Settings:
    path = storage.settings_path(output)
    if not storage.exists(path):
        raise Refused(f"{output} is not a master-poc output (no {path})")
    return Settings.from_json(storage.read_json(path))


def clinical_line(table: ClinicalTable) -> str:
    """What the run says about the clinical table it read."""
    ident = table.identity
    how = f", {TableFormat.from_json(ident.format).describe()}" if ident is not None and ident.format else ""
    split = ("split by patient (subjectid)" if table.by_patient
             else "split by case id: the table has no subjectid column")
    return f"clinical table {table.path}: {len(table.rows)} rows{how}; {split}"


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


# ---- run ------------------------------------------------------------------------------

def _cases_and_clinical(req: RunRequest, source: Source, record: RunRecord) -> tuple[list[int], ClinicalTable]:
    """The requested cases (--cases, else every case of the source, or of the
    clinical table where the source lists none) and the clinical table."""
    case_ids = req.case_ids()
    web = req.options.web()
    if case_ids is not None:
        return case_ids, read_clinical(record.clinical, case_ids, web)
    try:
        listed = source.list_case_ids()
    except Exception as e:  # any filesystem's error: no access, a bad endpoint, ...
        raise Refused(f"cannot list --input {record.input}: {e}") from None
    if listed is None:  # a web server lists nothing: every case of its clinical table
        table = read_clinical(record.clinical, None, web)
        if not table.case_ids:
            raise Refused(f"the clinical table {record.clinical} has no cases")
        return table.case_ids, table
    if not listed:
        raise Refused(f"--input {record.input} holds no <id>.vital files")
    return listed, read_clinical(record.clinical, listed, web)


def _cohort_plan(req: RunRequest, source: Source, case_ids: list[int], clinical: ClinicalTable,
                 fs, out: TextIO) -> cohort_run.CohortPlan:
    """The criteria checked against the clinical table and the feature spec,
    and what the inputs decide (refused, exit 2, when they leave no case)."""
    o = req.options
    criteria = cohort.ordered(o.cohort)
    try:
        cohort.check(criteria, clinical.frame if clinical.frame is not None else pd.DataFrame(), fs)
    except cohort.CohortError as e:
        raise Refused(str(e)) from None
    table, where = None, None
    if any(c.kind == cohort.REQUIRE for c in criteria):
        where = o.track_list or source.track_list
        if where:
            t = time.time()
            table = cohort_run.read_track_table(where, o.web())
            _say(out, f"track list {where}: {len(table)} rows, {table['caseid'].nunique()} cases "
                      f"({time.time() - t:.1f} s)")
    return cohort_run.plan(case_ids, criteria, clinical, fs, table, where)


def _this_process_cohort(req: RunRequest, plan: cohort_run.CohortPlan, fs, out: TextIO
                         ) -> tuple[list[int], frozenset]:
    """This process's share of the cases the inputs keep, less what the
    output's markers decide; the excluded markers of its cases made to say
    so. Returns (the cases for stage 1, those it checks by their track list)."""
    o = req.options
    mine = o.share.select(plan.work) if o.share else plan.work
    # The leader makes every case's markers say the current criteria before it waits (the decisions are the
    # same in every share), so a marker of earlier criteria never counts as this run's; the others their own.
    ours = plan.work if not o.share or o.share.leader else mine
    by_inputs = sorted(plan.by_inputs)
    ours_out = by_inputs if not o.share or o.share.leader else o.share.select(by_inputs)
    from_markers, check = cohort_run.decide_from_markers(o.output, ours, plan, fs)
    cohort_run.record(o.output, ours + ours_out, {**{c: plan.by_inputs[c] for c in ours_out}, **from_markers},
                      check)
    check = frozenset(c for c in check if c in set(mine))
    if plan.criteria:
        _say(out, f"cohort: {len(plan.by_inputs)} of {len(plan.requested)} requested cases left out by the "
                  f"clinical{' and track' if plan.track_list else ''} criteria"
                  + (f", {len(from_markers)} more by what the output recorded" if from_markers else "")
                  + (f"; {len(check)} to check by their file's track list" if check else ""))
    return [c for c in mine if c not in from_markers], check


def _stage1(req: RunRequest, runner: StageRunner, record: RunRecord, job, out: TextIO) -> dict:
    """Stage 1 with progress lines; its counters."""
    progress = Progress(req.options.output, job.case_ids, out=out)
    progress.snapshot()  # the baseline: cases/min counts only this run's work
    t = time.time()
    counts = run_with(runner, job, progress, req.options.progress_interval)
    record.timings["stage1_s"] = round(time.time() - t, 3)
    progress()
    return counts


def run_command(req: RunRequest, runner: StageRunner, record: RunRecord, out: TextIO) -> RunResult:
    o = req.options
    req.case_ids()  # a bad --cases is refused before any work
    if record.input is None:
        from pipeline.tools.sample import write_default_sample
        record.input = o.sample_dir or tempfile.mkdtemp(prefix="master-poc-sample-")
        _say(out, f"no --input: generating {o.sample_cases} VitalDB-format sample cases in {record.input}")
        write_default_sample(record.input, o.sample_cases, req.settings)
    source = Source.for_location(record.input, o.web())
    record.source = source.describe()
    record.clinical = record.clinical or source.default_clinical()
    case_ids, clinical = _cases_and_clinical(req, source, record)
    record.requested, record.clinical_table = case_ids, clinical.identity
    _say(out, clinical_line(clinical))
    fs = req.settings.feature_spec()
    plan = _cohort_plan(req, source, case_ids, clinical, fs, out)  # refused before anything is written
    record.criteria, record.track_list, record.clinical_frame = plan.criteria, plan.track_list, clinical.frame
    guard_output(o.output, req.settings, o.overwrite)
    storage.write_json(storage.cohort_path(o.output), {"criteria": [c.to_json() for c in plan.criteria],
                                                       "track_list": plan.track_list})

    work = plan.work
    todo, check = _this_process_cohort(req, plan, fs, out)
    who = f" (share {o.share} of {len(work)} cases)" if o.share else ""
    what = f"{source.dataset} ({source.location})" if source.dataset else source.location
    _say(out, f"stage 1: {len(todo)} cases{who} from {what} -> {storage.cases_dir(o.output)}")
    counts: dict[str, int] = {}
    if todo:
        require = tuple(c for c in plan.criteria if c.kind == cohort.REQUIRE)
        job = stage_job(req, Stage1Job, case_ids=todo, source=source, clinical=clinical.without_frame(),
                        require=require, check_tracks=check)
        counts = _stage1(req, runner, record, job, out)
        cohort_run.settle(o.output, todo, plan, fs)
    if o.no_finalize or (o.share and not o.share.leader):
        return _stage1_only(req, todo, counts)
    if o.share:
        missing = coordination.wait_for_markers(o.output, work, o.leader_wait_s, o.poll_s,
                                                lambda: runner.stopping, lambda text: _say(out, text))
        if runner.stopping:
            raise Interrupted()
        if missing:
            return _leader_gave_up(req, record, missing, counts)
        cohort_run.settle(o.output, work, plan, fs)
    _say(out, f"stage 2: writing splits to {o.output}")
    meta = Finalize(record, runner, req).run()
    if meta.status != Status.COMPLETE:
        return RunResult(EXIT_FAILED, meta.status, metadata=meta, counters=counts,
                         message="verification failed: " + "; ".join(meta.verification.problems[:5]))
    rate = meta.cases.success_rate
    if rate < o.min_success_rate:
        return RunResult(EXIT_FAILED, Status.COMPLETE, metadata=meta, counters=counts,
                         message=f"success rate {rate:.1%} is below --min-success-rate {o.min_success_rate:.0%}")
    return RunResult(EXIT_OK, Status.COMPLETE, metadata=meta, counters=counts)


def _stage1_only(req: RunRequest, mine: list[int], counts: dict) -> RunResult:
    o = req.options
    excluded = storage.marker_ids(o.output, storage.EXCLUDED) & set(mine)
    done = sorted((storage.marker_ids(o.output, storage.DONE) & set(mine)) - excluded)
    failed = storage.read_failed(o.output, sorted((storage.marker_ids(o.output, storage.FAILED) & set(mine))
                                                  - set(done) - excluded))
    report = Stage1Report(mine, done, failed, sorted(excluded))
    if not report.complete:
        missing = len(mine) - len(done) - len(failed) - len(excluded)
        return RunResult(EXIT_FAILED, Status.STAGE1_DONE, counters=counts, stage1=report,
                         message=f"{missing} of these cases have no marker: rerun the same command to continue")
    owed = "share 1 finalizes" if o.share and not o.share.leader else "finalize is still owed"
    return RunResult(EXIT_OK, Status.STAGE1_DONE, counters=counts, stage1=report, message=owed)


def _leader_gave_up(req: RunRequest, record: RunRecord, missing: list[int], counts: dict) -> RunResult:
    o = req.options
    # The same data settings (or the output refuses the run) and clinical table.
    flags = settings_flags(req.settings) + (["--clinical", o.clinical] if o.clinical else []) + cohort_flags(o)
    cmd = finish_command(record.input, o.output, o.cases or ",".join(map(str, record.requested)), flags)
    meta = record.write(Status.INCOMPLETE)
    return RunResult(EXIT_FAILED, Status.INCOMPLETE, metadata=meta, counters=counts,
                     message=f"{len(missing)} cases have no marker after {o.leader_wait_s:.0f} s: "
                             f"{missing[:30]}{' ...' if len(missing) > 30 else ''}; finalize is still owed. "
                             f"To complete the job (committed cases are skipped): {cmd}")


# ---- finalize, verify, interrupted -----------------------------------------------------------

def finalize_command(req: RunRequest, runner: StageRunner, record: RunRecord) -> RunResult:
    """Stage 2 alone, with the output's own settings; where the data came from
    is what the run that made the output recorded."""
    if req.options.cohort:
        raise Refused("finalize takes the cohort the output was made with (its metadata, its markers); to change "
                      "the criteria, run the job again with them: committed cases are not recomputed")
    record.settings = load_settings(req.options.output)
    record.requested = req.case_ids()
    previous = (storage.read_json(storage.metadata_path(req.options.output))
                if storage.exists(storage.metadata_path(req.options.output)) else {})
    if record.input is None and previous:
        record.input, record.clinical = previous.get("input"), record.clinical or previous.get("clinical")
        record.source = previous.get("source")
        record.clinical_table = TableIdentity.from_json(previous.get("clinical_table"))
    cohort_path = storage.cohort_path(req.options.output)  # the last run's, also without a metadata yet
    cohort_record = storage.read_json(cohort_path) if storage.exists(cohort_path) else previous.get("cohort") or {}
    record.criteria = cohort.ordered(cohort.parse_criteria(cohort_record.get("criteria") or []))
    record.track_list = cohort_record.get("track_list")
    if record.criteria:  # min_measured of cases committed after the last flow (an interrupted run's)
        plan = cohort_run.CohortPlan(record.criteria, sorted(storage.marker_ids(req.options.output, storage.DONE)),
                                     {}, record.track_list)
        cohort_run.settle(req.options.output, plan.requested, plan, record.settings.feature_spec())
    if record.clinical:  # Table 1's rows
        try:
            record.clinical_frame = read_clinical(record.clinical, None, req.options.web()).frame
        except ClinicalTableError as e:
            _LOG.warning("Table 1 without clinical rows: %s", e)
    meta = Finalize(record, runner, dataclasses.replace(req, settings=record.settings)).run()
    return RunResult(EXIT_OK if meta.status == Status.COMPLETE else EXIT_FAILED, meta.status, metadata=meta)


def verify_command(req: RunRequest) -> RunResult:
    output = req.options.output
    settings = load_settings(output)
    v = verify_output(output, storage.read_selected_done(output), settings.split_names, os.cpu_count() or 1,
                      storage.read_excluded(output))
    return RunResult(EXIT_OK if v.ok else EXIT_FAILED, Status.VERIFIED if v.ok else Status.VERIFICATION_FAILED,
                     verification=v)


def _interrupted(req: RunRequest, runner: StageRunner, record: RunRecord) -> RunResult:
    """Records what was done (committed cases are safe) and what is owed."""
    name = signal.Signals(runner.stop_signal).name if runner.stop_signal else "a signal"
    meta = None
    if storage.exists(storage.settings_path(req.options.output)):
        record.settings = load_settings(req.options.output)
        meta = record.write(Status.INCOMPLETE)
    killed = " (pipeline killed after the grace period)" if runner.killed else ""
    return RunResult(EXIT_INTERRUPTED, Status.INTERRUPTED, metadata=meta, stopped_by=name,
                     message=f"stopped by {name}{killed}; rerun the same command to continue: "
                             "committed cases are skipped")


def run(req: RunRequest, out: Optional[TextIO] = None) -> RunResult:
    """Runs one request to the end and says how it went; never raises for
    bad input or a failed stage (the result says why)."""
    out = out or sys.stdout
    o = req.options
    t0 = time.time()
    record = RunRecord(o.output, req.settings, input=o.input, clinical=o.clinical, cases=o.cases,
                       num_shards=o.num_shards)

    def timed(res: RunResult) -> RunResult:
        return dataclasses.replace(res, elapsed_s=time.time() - t0)

    try:
        from pipeline.run import runtime
        runtime.setup_io(list(req.beam_args), o.s3_max_attempts, o.s3_retry_mode)
        from apache_beam.options.pipeline_options import PipelineOptions
        s3.preflight({"--input": o.input, "--clinical": o.clinical, "--output": o.output},
                     PipelineOptions(list(req.beam_args)))
        if req.command == "run":
            sources.preflight({"--input": o.input, "--clinical": o.clinical}, o.web())
        if req.command == "verify":
            return timed(verify_command(req))
        runner = Supervisor(o.shutdown_grace) if req.supervised else InProcess()
        with runner:
            try:
                if req.command == "finalize":
                    return timed(finalize_command(req, runner, record))
                return timed(run_command(req, runner, record, out))
            except Interrupted:
                return timed(_interrupted(req, runner, record))
    except (Refused, ClinicalTableError, s3.S3AccessError, OptionError, SourceError, cohort_run.CohortRefused,
            cohort.CohortError) as e:
        return timed(RunResult(EXIT_USAGE, Status.REFUSED, message=str(e)))
    except StageFailed as e:
        return timed(RunResult(EXIT_FAILED, Status.FAILED, message=str(e)))
