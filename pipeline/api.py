"""The run API: `run(RunRequest) -> RunResult`.

The command line (pipeline.cli), the SageMaker entry point (launch.entrypoint)
and the tests all call this; it holds no state between calls.

    run      stage 1 (cases -> committed case objects and markers), then
             stage 2 (split files), verification, metadata, schema, report;
             with a share I/N: stage 1 on this share, and share 1 waits for
             every marker and finalizes
    finalize stage 2 alone, from the markers (idempotent, byte-identical)
    verify   read every split file back and compare with the markers
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

from pipeline import coordination, job, metadata, s3, stage2, storage
from pipeline.contracts import FailedMarker, StageJob
from pipeline.options import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, OptionError, RunRequest,
                              settings_flags)
from pipeline.progress import Progress
from pipeline.supervisor import Supervisor
from transforms import spec
from transforms.cases import format_cases
from transforms.load import ClinicalTableError, TableFormat, read_clinical
from transforms.settings import Settings
from transforms.sources import Source, SourceError, check_reachable, is_web

_LOG = logging.getLogger("master_poc")


@dataclass
class Stage1Report:
    """Stage 1 of this process's cases, when no finalize follows here."""

    requested: list[int]
    done: list[int]
    failed: dict[int, FailedMarker]

    @property
    def complete(self) -> bool:
        return len(self.done) + len(self.failed) == len(self.requested)


@dataclass
class RunResult:
    exit_code: int
    status: str  # complete, incomplete, verification_failed, stage1_done, refused, failed, interrupted, verified
    message: str = ""  # why it did not succeed, and what to do
    metadata: Optional[dict] = None  # as written to preprocessing_metadata.json
    counters: dict = field(default_factory=dict)  # stage 1's Beam counters (cases_skipped, ...)
    elapsed_s: float = 0.0
    stage1: Optional[Stage1Report] = None
    verification: Optional[dict] = None
    stopped_by: Optional[str] = None  # the signal's name when interrupted


class Refused(Exception):
    """Bad input found before any work: exit 2, nothing written."""


class StageFailed(Exception):
    """A stage's pipeline failed (its log says why); committed work is kept."""


class Interrupted(Exception):
    """A shutdown was asked for (SIGTERM/SIGINT); committed work is kept."""


class InProcess:
    """Runs each stage in this process (RunRequest.supervised=False)."""

    stopping = False
    stop_signal = None
    child_killed = False
    progress = None
    progress_interval_s = 0.0
    stop_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run_job(self, stage_job: StageJob) -> tuple[int, dict[str, int]]:
        return 0, job.run_stage(stage_job)


def preflight_web(paths: dict[str, Optional[str]], web) -> None:
    """A web server that does not answer is refused at start (exit 2), as an
    unreachable S3 endpoint is."""
    for flag, path in paths.items():
        if path is None:
            continue
        source = Source.for_location(path, web)
        url = source.location if flag == "--input" else path
        if is_web(url):
            try:
                check_reachable(url, web)
            except SourceError as e:
                raise SourceError(f"{flag} {path}: {e}") from None


def clinical_line(identity: dict, rows: int) -> str:
    """What the run says about the clinical table it read."""
    how = f", {TableFormat.from_json(identity['format']).describe()}" if identity.get("format") else ""
    split = ("split by patient (subjectid)" if identity.get("split_key") == "subjectid"
             else "split by case id: the table has no subjectid column")
    return f"clinical table {identity.get('path')}: {rows} rows{how}; {split}"


def guard_output(output: str, settings: Settings, overwrite: bool) -> None:
    """An output keeps one fingerprint (settings, contract and format versions): refuse a silent mix."""
    path = storage.settings_path(output)
    new = metadata.fingerprint(settings)
    if storage.exists(path):
        # A setting added after the output was made reads as its default there.
        old = dict(metadata.fingerprint(Settings()), **storage.read_json(path))
        if old == new:
            return
        if not overwrite:
            diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
            raise Refused(f"{output} was made with other settings {diff} (old, new); use another --output, "
                          "the same settings, or --overwrite to start over")
        _LOG.warning("--overwrite: removing %s made with other settings", output)
        for part in storage.output_parts(output, spec.SPLIT_NAMES):
            storage.delete_tree(part)
        storage.delete([storage.metadata_path(output), storage.schema_path(output), storage.config_path(output)])
    storage.write_json(path, new)


def success_rate(meta: dict) -> float:
    ok, failed = len(meta["cases"]["ok"]), len(meta["cases"]["failed"])
    return 1.0 if ok + failed == 0 else ok / (ok + failed)


def load_settings(output: str) -> Settings:
    path = storage.settings_path(output)
    if not storage.exists(path):
        raise Refused(f"{output} is not a master-poc output (no {path})")
    return Settings.from_json(storage.read_json(path))


class _Run:
    """One invocation's state: when it started, what it was asked, timings."""

    def __init__(self, req: RunRequest, out: TextIO):
        self.req, self.o, self.out = req, req.options, out
        self.t0 = time.time()
        self.started = metadata.utcnow()
        self.timings: dict[str, float] = {}
        self.requested: Optional[list[int]] = None
        self.input_dir: Optional[str] = self.o.input  # as given ("vitaldb", a folder, a prefix, a URL)
        self.source: Optional[Source] = None  # where the files are, resolved
        self.clinical_path: Optional[str] = self.o.clinical
        self.clinical_table: Optional[dict] = None  # the identity of the table this run read
        self.previous: dict = {}  # the metadata already in the output (finalize)

    def config(self) -> dict:
        """The effective configuration, in the form --config reads: giving it
        back rebuilds the same dataset."""
        o = self.o
        cfg = self.req.settings.as_json()
        cfg.update(input=self.input_dir, clinical=self.clinical_path, output=o.output,
                   cases=format_cases(self.requested) if self.requested else o.cases, num_shards=o.num_shards)
        return {k: v for k, v in cfg.items() if v is not None}

    def where(self) -> dict:
        """The source and clinical table this run read (a finalize alone: what
        the run that made the output recorded)."""
        return {"source": self.source.describe() if self.source else self.previous.get("source"),
                "clinical_table": self.clinical_table or self.previous.get("clinical_table")}

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def result(self, code: int, status: str, **kw) -> RunResult:
        return RunResult(code, status, elapsed_s=time.time() - self.t0, **kw)

    def stage_job(self, stage: int, settings: Settings, **kw) -> StageJob:
        return StageJob(stage=stage, output=self.o.output, settings=settings, beam_args=list(self.req.beam_args),
                        verbose=self.o.verbose, s3_max_attempts=self.o.s3_max_attempts,
                        s3_retry_mode=self.o.s3_retry_mode, **kw)

    @staticmethod
    def run_stage(stages, stage_job: StageJob) -> dict[str, int]:
        if stages.stopping:
            raise Interrupted()
        rc, counts = stages.run_job(stage_job)
        if stages.stopping:
            raise Interrupted()
        if rc != 0:
            raise StageFailed(f"stage {stage_job.stage} pipeline failed (exit code {rc}, see the log above); "
                              "committed cases are kept, rerun the same command to continue")
        return counts

    # ---- run ----------------------------------------------------------------------

    def run(self, stages) -> RunResult:
        settings, o = self.req.settings, self.o
        case_ids = self.req.case_ids()  # a bad --cases is refused before any work
        if self.input_dir is None:
            from pipeline.sample import write_default_sample
            self.input_dir = o.sample_dir or tempfile.mkdtemp(prefix="master-poc-sample-")
            self.say(f"no --input: generating {o.sample_cases} VitalDB-format sample cases in {self.input_dir}")
            write_default_sample(self.input_dir, o.sample_cases, settings)
        source = self.source = Source.for_location(self.input_dir, o.web())
        self.clinical_path = self.clinical_path or source.default_clinical()
        clinical = None
        if case_ids is None:
            try:
                listed = source.list_case_ids()
            except Exception as e:  # any filesystem's error: no access, a bad endpoint, ...
                raise Refused(f"cannot list --input {self.input_dir}: {e}") from None
            if listed is None:  # a web server lists nothing: every case of its clinical table
                clinical = read_clinical(self.clinical_path, None, o.web())
                listed = clinical.case_ids
                where = f"the clinical table {self.clinical_path}"
            else:
                where = f"--input {self.input_dir}"
            if not listed:
                raise Refused(f"{where} holds no <id>.vital files" if clinical is None else f"{where} has no cases")
            case_ids = listed
        self.requested = case_ids
        clinical = clinical or read_clinical(self.clinical_path, case_ids, o.web())
        self.clinical_table = clinical.identity
        self.say(clinical_line(clinical.identity, len(clinical.rows)))
        guard_output(o.output, settings, o.overwrite)

        mine = o.share.select(case_ids) if o.share else case_ids
        who = f" (share {o.share} of {len(case_ids)} cases)" if o.share else ""
        what = f"{source.dataset} ({source.location})" if source.dataset else source.location
        self.say(f"stage 1: {len(mine)} cases{who} from {what} -> {storage.cases_dir(o.output)}")
        counts: dict[str, int] = {}
        if mine:
            progress = Progress(o.output, mine, out=self.out)
            progress.snapshot()  # the baseline: cases/min counts only this run's work
            stages.progress, stages.progress_interval_s = progress, o.progress_interval
            t1 = time.time()
            counts = self.run_stage(stages, self.stage_job(1, settings, case_ids=mine, source=source,
                                                            clinical=clinical))
            stages.progress = None
            self.timings["stage1_s"] = round(time.time() - t1, 3)
            progress()
        if o.no_finalize or (o.share and not o.share.leader):
            return self.stage1_only(mine, counts)
        if o.share:
            missing = coordination.wait_for_markers(o.output, case_ids, o.leader_wait_s, o.poll_s,
                                                    lambda: stages.stopping, self.say)
            if stages.stopping:
                raise Interrupted()
            if missing:
                return self.leader_gave_up(settings, missing, counts)
        self.say(f"stage 2: writing splits to {o.output}")
        meta = self.finalize(stages, settings)
        if meta["status"] != "complete":
            return self.result(EXIT_FAILED, meta["status"], metadata=meta, counters=counts,
                               message="verification failed: " + "; ".join(meta["verification"]["problems"][:5]))
        rate = success_rate(meta)
        if rate < o.min_success_rate:
            return self.result(EXIT_FAILED, "complete", metadata=meta, counters=counts,
                               message=f"success rate {rate:.1%} is below --min-success-rate "
                                       f"{o.min_success_rate:.0%}")
        return self.result(EXIT_OK, "complete", metadata=meta, counters=counts)

    def stage1_only(self, mine: list[int], counts: dict) -> RunResult:
        out = self.o.output
        done = sorted(storage.marker_ids(out, storage.DONE) & set(mine))
        failed = storage.read_failed(out, sorted((storage.marker_ids(out, storage.FAILED) & set(mine)) - set(done)))
        report = Stage1Report(mine, done, failed)
        if not report.complete:
            missing = len(mine) - len(done) - len(failed)
            return self.result(EXIT_FAILED, "stage1_done", counters=counts, stage1=report,
                               message=f"{missing} of these cases have no marker: rerun the same command to continue")
        owed = "share 1 finalizes" if self.o.share and not self.o.share.leader else "finalize is still owed"
        return self.result(EXIT_OK, "stage1_done", counters=counts, stage1=report, message=owed)

    def leader_gave_up(self, settings: Settings, missing: list[int], counts: dict) -> RunResult:
        o = self.o
        # The same data settings (or the output refuses the run) and clinical table.
        flags = settings_flags(settings) + (["--clinical", o.clinical] if o.clinical else [])
        cmd = coordination.finish_command(self.input_dir, o.output, o.cases or ",".join(map(str, self.requested)),
                                          flags)
        meta = metadata.write_outputs(o.output, settings, "incomplete", requested=self.requested,
                                      started=self.started, input_dir=self.input_dir,
                                      clinical_path=self.clinical_path, timings=self.timings, config=self.config(),
                                      **self.where())
        return self.result(EXIT_FAILED, "incomplete", metadata=meta, counters=counts,
                           message=f"{len(missing)} cases have no marker after {o.leader_wait_s:.0f} s: "
                                   f"{missing[:30]}{' ...' if len(missing) > 30 else ''}; finalize is still owed. "
                                   f"To complete the job (committed cases are skipped): {cmd}")

    # ---- finalize -----------------------------------------------------------------

    def finalize(self, stages, settings: Settings) -> dict:
        """Stage 2 + verification + metadata, from the markers alone."""
        o = self.o
        t2 = time.time()
        done = storage.read_done(o.output)
        # A case object that is not what its marker says (truncated, missing) is
        # named and its case demoted to failed (a rerun recomputes it); the
        # split files are written from the others.
        damaged = stage2.check_case_objects(o.output, done, spec.SPLIT_NAMES)
        for cid, detail in damaged.items():
            _LOG.error("case %s: %s; the case is now failed (%s): rerun to recompute it", cid, detail,
                       stage2.DAMAGED)
            storage.demote(o.output, cid, stage2.DAMAGED, detail)
            done.pop(cid)
        plans = stage2.plan_shards(o.output, done, spec.SPLIT_NAMES, o.num_shards, settings.split_seed)
        if plans:
            counts = self.run_stage(stages, self.stage_job(2, settings, plans=plans))
            self.timings["stage2_shard_write_s"] = round(counts.get("shard_write_us", 0) / 1e6, 6)
        stage2.remove_stale_shards(o.output, plans, spec.SPLIT_NAMES)
        storage.delete(storage.list_files(storage.tmp_glob(o.output)))
        if stages.stopping:
            raise Interrupted()
        t3 = time.time()
        self.timings["stage2_s"] = round(t3 - t2, 3)
        verification = stage2.verify_output(o.output, done, spec.SPLIT_NAMES, os.cpu_count() or 1)
        # Damage found only by reading (a changed byte): the split file holding it
        # is reported; its case is demoted so the next finalize leaves it out.
        for cid, detail in verification["damaged_cases"].items():
            storage.demote(o.output, cid, stage2.DAMAGED, detail)
            done.pop(cid, None)
        if damaged:
            verification["ok"] = False
            verification["problems"] += [f"case {c}: {d} (case demoted to failed: rerun to recompute it)"
                                         for c, d in damaged.items()]
        self.timings["verify_s"] = round(time.time() - t3, 3)
        return metadata.write_outputs(o.output, settings, "complete" if verification["ok"] else "verification_failed",
                                      requested=self.requested, verification=verification, started=self.started,
                                      input_dir=self.input_dir, clinical_path=self.clinical_path, done=done,
                                      timings=self.timings, config=self.config(), **self.where())

    def finalize_command(self, stages) -> RunResult:
        settings = load_settings(self.o.output)
        self.requested = self.req.case_ids()
        # Where the data came from is what the run that made the output recorded.
        if self.input_dir is None and storage.exists(storage.metadata_path(self.o.output)):
            self.previous = previous = storage.read_json(storage.metadata_path(self.o.output))
            self.input_dir, self.clinical_path = previous.get("input"), self.clinical_path or previous.get("clinical")
        self.req = dataclasses.replace(self.req, settings=settings)
        meta = self.finalize(stages, settings)
        code = EXIT_OK if meta["status"] == "complete" else EXIT_FAILED
        return self.result(code, meta["status"], metadata=meta)

    def verify(self) -> RunResult:
        load_settings(self.o.output)
        done = storage.read_done(self.o.output)
        v = stage2.verify_output(self.o.output, done, spec.SPLIT_NAMES, os.cpu_count() or 1)
        return self.result(EXIT_OK if v["ok"] else EXIT_FAILED, "verified" if v["ok"] else "verification_failed",
                           verification=v)

    def interrupted(self, stages) -> RunResult:
        """Records what was done (committed cases are safe) and what is owed."""
        name = signal.Signals(stages.stop_signal).name if stages.stop_signal else "a signal"
        meta = None
        if storage.exists(storage.settings_path(self.o.output)):
            meta = metadata.write_outputs(self.o.output, load_settings(self.o.output), "incomplete",
                                          requested=self.requested, started=self.started,
                                          input_dir=self.input_dir, clinical_path=self.clinical_path,
                                          timings=self.timings, config=self.config(), **self.where())
        killed = " (pipeline killed after the grace period)" if stages.child_killed else ""
        return self.result(EXIT_INTERRUPTED, "interrupted", metadata=meta, stopped_by=name,
                           message=f"stopped by {name}{killed}; rerun the same command to continue: "
                                   "committed cases are skipped")


def run(req: RunRequest, out: Optional[TextIO] = None) -> RunResult:
    """Runs one request to the end and says how it went; never raises for
    bad input or a failed stage (the result says why)."""
    ctx = _Run(req, out or sys.stdout)
    o = req.options
    try:
        from pipeline import runtime
        runtime.setup_io(list(req.beam_args), o.s3_max_attempts, o.s3_retry_mode)
        from apache_beam.options.pipeline_options import PipelineOptions
        s3.preflight({"--input": o.input, "--clinical": o.clinical, "--output": o.output},
                     PipelineOptions(list(req.beam_args)))
        if req.command == "run":
            preflight_web({"--input": o.input, "--clinical": o.clinical}, o.web())
        if req.command == "verify":
            return ctx.verify()
        stages = Supervisor(o.shutdown_grace) if req.supervised else InProcess()
        with stages:
            try:
                if req.command == "finalize":
                    return ctx.finalize_command(stages)
                return ctx.run(stages)
            except Interrupted:
                return ctx.interrupted(stages)
    except (Refused, ClinicalTableError, s3.S3AccessError, OptionError, SourceError) as e:
        return ctx.result(EXIT_USAGE, "refused", message=str(e))
    except StageFailed as e:
        return ctx.result(EXIT_FAILED, "failed", message=str(e))

