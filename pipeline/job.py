"""Child-process entry point: runs one Beam stage described by a JSON file.

Started by pipeline.supervisor; not meant to be run by hand.
"""
from __future__ import annotations

import json
import logging
import sys

from pipeline import cli, stage1, stage2
from transforms.case import Settings
from transforms.load import ClinicalTable


def settings_from_dict(d: dict) -> Settings:
    return Settings(**{k: (tuple(v) if k == "split" else v) for k, v in d.items() if k != "spec_version"})


def main(path: str) -> int:
    with open(path) as fh:
        job = json.load(fh)
    cli.configure_logging(job.get("verbose", False))
    cli.apply_s3_retry_env(job["s3_max_attempts"], job["s3_retry_mode"])
    p = cli.make_pipeline(job["beam_args"])
    settings = settings_from_dict(job["settings"])
    if job["stage"] == 1:
        clinical = ClinicalTable.from_json(job["clinical"])
        stage1.build_stage1(p, job["case_ids"], job["input"], job["output"], settings, clinical,
                            stop_file=job["stop_file"])
    else:
        plans = [stage2.ShardPlan.from_json(pl) for pl in job["plans"]]
        stage2.build_stage2(p, job["output"], plans, settings.split_seed)
    result = p.run()
    result.wait_until_finish()
    with open(job["result_file"], "w") as fh:
        json.dump({"counters": cli.counters(result)}, fh)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main(sys.argv[1]))
