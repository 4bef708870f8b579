"""Where a stage runs: the process-wide setup (logging, S3 settings for every
client, Beam's and ours), the Beam pipeline object, and one stage run to its
end, `run_stage(StageJob)`, in this process or in the supervisor's child
process (`run_in_child`).

Without --runner the job runs on Beam's FnApiRunner (the DirectRunner's
engine, pinned so it behaves the same offline and online) in
multi_processing mode with one worker process per core.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable, Optional, Protocol

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipeline.io import remote, s3
from pipeline.options import RunRequest
from pipeline.output.contracts import Stage1Job, StageJob
from pipeline.stages import stage1, stage2
from pipeline.stages.dofns import NAMESPACE


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for noisy in ("apache_beam", "root", "botocore", "absl"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Worker logs are relayed at WARNING; keep ours, drop Beam's start-up chatter.
        for h in logging.getLogger().handlers:
            h.addFilter(lambda r: "semi_persistent_directory" not in r.getMessage())


def setup_io(beam_args: Iterable[str], s3_max_attempts: int = s3.DEFAULT_MAX_ATTEMPTS,
             s3_retry_mode: str = s3.DEFAULT_RETRY_MODE) -> None:
    """Applies this process's I/O options: S3 retries for every client, shared
    boto3 clients, and our own FileSystems calls (listing, markers, config
    files, track maps) with the Beam flags' S3/GCS options; the S3 options are
    also exported to the environment, which the stage process and local Beam
    workers inherit. Calling it again with the same flags changes nothing; a later
    call with other flags replaces the FileSystems options and the variables it
    sets (an S3 option it does not name keeps its earlier variable).

    The one home of this, with one rule: Beam flags are applied where they
    enter the process, before anything is read with them, and by the entry
    point that takes them in, never by the code below it:
      * the command line's, by the command that parses them (cli.parse_request,
        cli inspect, the launcher's --estimate-from), before a config file is read;
      * a config file's or the hyperparameters' beam_args, with the flags known
        so far, as the mapping is read and before its options are parsed, so
        its track map is read with them (cli.apply_beam_args_in);
      * a run's (api.run): its request's Beam flags with its
        --s3-max-attempts/--s3-retry-mode, for the whole run (an embedder's
        RunRequest gets them there too).
    The forked stage process (run_in_child) inherits them all; it applies
    nothing and only drops the parent's S3 clients and connections."""
    s3.apply_retry_env(s3_max_attempts, s3_retry_mode)
    s3.prepare_process()
    options = PipelineOptions(list(beam_args))
    FileSystems.set_options(options)
    s3.export_options_to_env(options)


def make_pipeline(beam_args: list[str], stage: int = 1) -> beam.Pipeline:
    """A Pipeline for the given Beam flags; FnApiRunner with one worker per
    core, unless the flags say otherwise: processes for stage 1 (parsing is
    CPU-bound Python), threads for stage 2, which only copies bytes between
    files (measured: worker processes cost ~4 s of start-up for 2 ms of
    shard writing on a 12-case run)."""
    opts = PipelineOptions(list(beam_args))
    if opts.view_as(StandardOptions).runner is not None:
        return beam.Pipeline(options=opts)
    direct = opts.view_as(DirectOptions)
    if not any(a.startswith("--direct_running_mode") for a in beam_args):
        direct.direct_running_mode = "multi_processing" if stage == 1 else "multi_threading"
    if direct.direct_running_mode == "in_memory":
        direct.direct_num_workers = 1  # one process: more "workers" would only warn
    elif not any(a.startswith("--direct_num_workers") for a in beam_args) or direct.direct_num_workers == 0:
        direct.direct_num_workers = os.cpu_count() or 1
    return beam.Pipeline(runner=FnApiRunner(), options=opts)


def counters(result) -> dict[str, int]:
    """This project's Beam counters of a finished pipeline ({} where the runner has none)."""
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except (NotImplementedError, AttributeError):
        return {}
    return {c.key.metric.name: int(c.committed or c.attempted or 0) for c in res["counters"]}


def run_stage(job: StageJob) -> dict[str, int]:
    """Builds and runs the stage's pipeline; returns its counters."""
    p = make_pipeline(job.beam_args, job.stage)
    (stage1.build_stage1 if isinstance(job, Stage1Job) else stage2.build_stage2)(p, job)
    result = p.run()
    result.wait_until_finish()
    return counters(result)


def run_in_child(job: StageJob, result_path: str) -> int:
    """The stage process's work (pipeline.run.supervisor forks it from the run
    that made `job`): the run's I/O options are inherited as the fork's
    (environment, FileSystems options, the shared-client patch: see
    setup_io), only its S3 clients and connections are not shared; the stage,
    its counters written for the parent."""
    s3.forget_clients()  # the one cache of S3 clients; a forked child builds its own clients and connections
    remote.forget_connections()
    counts = run_stage(job)
    with open(result_path, "w") as fh:
        json.dump({"counters": counts}, fh)
    return 0


# ---- how a command has its stages run ------------------------------------------------

class StageFailed(Exception):
    """A stage's pipeline failed (its log says why); committed work is kept."""


class Interrupted(Exception):
    """A shutdown was asked for (SIGTERM/SIGINT); committed work is kept."""


class StageRunner(Protocol):
    """Runs Beam stages for a command: `pipeline.run.supervisor.Supervisor` (each
    stage in a child process group it can drain and kill on SIGTERM) or
    `InProcess` (in this process, for embedding and tests)."""

    stopping: bool  # a shutdown was asked for
    stop_signal: Optional[int]  # the signal that asked
    killed: bool  # the stage was killed after the grace period

    def __enter__(self) -> "StageRunner": ...

    def __exit__(self, *exc) -> bool: ...

    def run_job(self, job: StageJob, progress: Optional[Callable[[], None]] = None,
                progress_interval_s: float = 30.0) -> tuple[int, dict[str, int]]:
        """(exit code, counters) of the stage; `progress()` is called every
        `progress_interval_s` while it runs (where the runner can)."""
        ...


class InProcess(StageRunner):
    """Each stage in this process (RunRequest.supervised=False): no signal
    handling, no progress lines while a stage runs."""

    def __init__(self):
        self.stopping = False
        self.stop_signal = None
        self.killed = False

    def __enter__(self) -> "InProcess":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def run_job(self, job: StageJob, progress: Optional[Callable[[], None]] = None,
                progress_interval_s: float = 30.0) -> tuple[int, dict[str, int]]:
        return 0, run_stage(job)


def stage_job(req: RunRequest, kind: type, **kw) -> StageJob:
    """A stage of this request (`kind`: Stage1Job or Stage2Job): its Beam flags, and `kw`
    (its S3 settings it inherits from the run's process: setup_io)."""
    o = req.options
    return kind(output=o.output, settings=req.settings, beam_args=list(req.beam_args), verbose=o.verbose, **kw)


def run_with(runner: StageRunner, job: StageJob, progress: Optional[Callable[[], None]] = None,
             progress_interval_s: float = 30.0) -> dict[str, int]:
    """The stage's counters; Interrupted if a shutdown was asked for before or
    during it, StageFailed if its pipeline failed."""
    if runner.stopping:
        raise Interrupted()
    rc, counts = runner.run_job(job, progress, progress_interval_s)
    if runner.stopping:
        raise Interrupted()
    if rc != 0:
        raise StageFailed(f"stage {job.stage} pipeline failed (exit code {rc}, see the log above); "
                          "committed cases are kept, rerun the same command to continue")
    return counts
