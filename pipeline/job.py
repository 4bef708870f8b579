"""Runs one Beam stage: `run_stage(StageJob)`, in this process or, through
the supervisor, in a child process (`run_in_child`).
"""
from __future__ import annotations

import json

from pipeline import runtime, s3, stage1, stage2
from pipeline.contracts import StageJob
from transforms import sources


def run_stage(job: StageJob) -> dict[str, int]:
    """Builds and runs the stage's pipeline; returns its counters."""
    p = runtime.make_pipeline(job.beam_args, job.stage)
    if job.stage == 1:
        stage1.build_stage1(p, job)
    else:
        stage2.build_stage2(p, job)
    result = p.run()
    result.wait_until_finish()
    return runtime.counters(result)


def run_in_child(job: StageJob, result_path: str) -> int:
    """The stage process's work (pipeline.supervisor forks it): a fresh set
    of S3 clients (the parent's connections are not shared), the stage, its
    counters written for the parent."""
    s3.forget_clients()
    sources.forget_clients()
    runtime.setup_io(job.beam_args, job.s3_max_attempts, job.s3_retry_mode)
    counts = run_stage(job)
    with open(result_path, "w") as fh:
        json.dump({"counters": counts}, fh)
    return 0
