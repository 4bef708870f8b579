"""The process-wide setup a run needs, in one place: logging, S3 settings
for every client (Beam's and ours), and the Beam pipeline object.

Without --runner the job runs on Beam's FnApiRunner (the DirectRunner's
engine, pinned so it behaves the same offline and online) in
multi_processing mode with one worker process per core.
"""
from __future__ import annotations

import logging
import os

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipeline import s3
from transforms.beam import NAMESPACE


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for noisy in ("apache_beam", "root", "botocore", "absl"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Worker logs are relayed at WARNING; keep ours, drop Beam's start-up chatter.
        for h in logging.getLogger().handlers:
            h.addFilter(lambda r: "semi_persistent_directory" not in r.getMessage())


def setup_io(beam_args: list[str], s3_max_attempts: int, s3_retry_mode: str) -> None:
    """S3 retries for every client, shared boto3 clients, and our own
    FileSystems calls (listing, markers) with the pipeline's S3/GCS options;
    the S3 options are also exported to the environment, which the stage
    process and local Beam workers inherit."""
    s3.apply_retry_env(s3_max_attempts, s3_retry_mode)
    s3.log_retries()
    s3.share_boto3_clients()
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
