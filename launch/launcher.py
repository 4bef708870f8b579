"""master-poc-launch: start the preprocessing as a SageMaker training job.

    master-poc-launch --cases 1-3000 --instance-count 6 --use-spot \\
        --image-uri 123456789012.dkr.ecr.eu-north-1.amazonaws.com/master-poc:1.0.0 \\
        --role arn:aws:iam::123456789012:role/master-poc-preprocess \\
        --input s3://bucket/vital --output s3://bucket/processed/run-1 --region eu-north-1 --wait

Values may also come from a YAML file (--config); flags win. Everything is
validated before any AWS call. --dry-run prints the CreateTrainingJob request
as JSON and calls nothing. The request is built by the SageMaker Python SDK
v3 (`sagemaker.train.ModelTrainer` with Compute, StoppingCondition,
CheckpointConfig, OutputDataConfig) and sent as built, so what --dry-run
prints is what is sent.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Optional

from transforms.cases import CaseSpecError, parse_cases

DEFAULTS = {"instance_type": "ml.m5.2xlarge", "instance_count": 1, "use_spot": True, "max_run": 93600,
            "volume_size": 50}
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
PASSTHROUGH = ("clinical", "window", "step", "horizon", "split", "split_seed", "num_shards", "min_success_rate",
               "leader_wait_s", "progress_interval", "beam_args")


class LaunchError(Exception):
    """Invalid launcher input, said before any AWS call."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="master-poc-launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with any of these options (underscored names); flags win")
    ap.add_argument("--cases", help='case ids, e.g. "1-3000"')
    ap.add_argument("--instance-count", type=int)
    ap.add_argument("--instance-type", help=f"default {DEFAULTS['instance_type']}")
    spot = ap.add_mutually_exclusive_group()
    spot.add_argument("--use-spot", dest="use_spot", action="store_true", default=None, help="managed spot (default)")
    spot.add_argument("--no-spot", dest="use_spot", action="store_false")
    ap.add_argument("--max-run", type=int, help=f"seconds (default {DEFAULTS['max_run']})")
    ap.add_argument("--max-wait", type=int, help="seconds, spot only (default 2 x max-run)")
    ap.add_argument("--volume-size", type=int, help=f"GB of EBS per instance (default {DEFAULTS['volume_size']})")
    ap.add_argument("--image-uri", help="the pushed Docker image (see README)")
    ap.add_argument("--role", help="IAM role ARN the job runs as")
    ap.add_argument("--input", help="s3:// prefix with the .vital files")
    ap.add_argument("--clinical", help="s3:// path of clinical_data.csv (default <input>/clinical_data.csv)")
    ap.add_argument("--output", help="s3:// prefix for the processed data (shared by all instances)")
    ap.add_argument("--region")
    ap.add_argument("--job-name", help="default: master-poc-preprocess-<timestamp>")
    ap.add_argument("--tags", help="key=value,key2=value2")
    ap.add_argument("--volume-kms-key", help="KMS key for the instances' storage volumes")
    ap.add_argument("--output-kms-key", help="KMS key for the job's output")
    ap.add_argument("--hyperparameter", action="append", default=[], metavar="KEY=VALUE",
                    help="extra job setting passed to the container (window, horizon, num_shards, ...)")
    ap.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request; call nothing")
    ap.add_argument("--wait", action="store_true", help="follow the job and exit with its outcome")
    return ap


def resolve(args: argparse.Namespace) -> dict:
    """Flags over the YAML config over defaults; validated. Raises LaunchError."""
    cfg: dict = {}
    if args.config:
        import yaml
        try:
            with open(args.config) as fh:
                cfg = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as e:
            raise LaunchError(f"--config {args.config}: {e}") from None
        if not isinstance(cfg, dict):
            raise LaunchError(f"--config {args.config}: expected a mapping of option: value")
        unknown = set(cfg) - set(vars(args)) - set(PASSTHROUGH)
        if unknown:
            raise LaunchError(f"--config {args.config}: unknown options {sorted(unknown)}")
    v = dict(DEFAULTS)
    v.update({k: val for k, val in cfg.items()})
    v.update({k: val for k, val in vars(args).items() if val is not None and k not in ("config", "hyperparameter")})
    problems = []
    try:
        parse_cases(str(v.get("cases") or ""))
    except CaseSpecError as e:
        problems.append(str(e))
    if int(v["instance_count"]) < 1:
        problems.append(f"--instance-count must be at least 1 (got {v['instance_count']})")
    if int(v["max_run"]) <= 0:
        problems.append("--max-run must be positive")
    if v["use_spot"]:
        if v.get("max_wait") is None:
            v["max_wait"] = 2 * int(v["max_run"])
        if int(v["max_wait"]) <= int(v["max_run"]):
            problems.append(f"with spot, --max-wait ({v['max_wait']}) must exceed --max-run ({v['max_run']})")
    else:
        v["max_wait"] = None
    for key in ("input", "output"):
        if not str(v.get(key) or "").startswith("s3://"):
            problems.append(f"--{key} must be an s3:// prefix for SageMaker (got {v.get(key)!r})")
    if v.get("clinical") and not str(v["clinical"]).startswith("s3://"):
        problems.append(f"--clinical must be on s3:// (got {v['clinical']!r})")
    for key in ("image_uri", "role", "region"):
        if not v.get(key):
            problems.append(f"--{key.replace('_', '-')} is required")
    if v.get("job_name") and not _JOB_NAME.match(v["job_name"]):
        problems.append(f"--job-name {v['job_name']!r}: 1-63 letters, digits and hyphens")
    tags = {}
    for part in filter(None, str(v.get("tags") or "").split(",")):
        if "=" not in part:
            problems.append(f"--tags: {part!r} is not key=value")
        else:
            k, val = part.split("=", 1)
            tags[k.strip()] = val.strip()
    v["tags"] = tags
    extra = dict(cfg.get("hyperparameters") or {})
    for item in args.hyperparameter:
        if "=" not in item:
            problems.append(f"--hyperparameter {item!r} is not KEY=VALUE")
        else:
            k, val = item.split("=", 1)
            extra[k] = val
    v["extra_hyperparameters"] = extra
    if problems:
        raise LaunchError("; ".join(problems))
    return v


def hyperparameters(v: dict) -> dict[str, str]:
    hp = {"cases": str(v["cases"]), "input": v["input"], "output": v["output"]}
    for k in PASSTHROUGH:
        if v.get(k) not in (None, ""):
            hp[k] = str(v[k])
    hp.update({k: str(val) for k, val in v["extra_hyperparameters"].items()})
    return hp


def build_request(v: dict, session=None) -> tuple[dict, dict]:
    """The CreateTrainingJob request, in boto3 form (printed) and in
    sagemaker-core form (sent), both from one ModelTrainer."""
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import CheckpointConfig, Compute, OutputDataConfig, StoppingCondition, Tag
    compute = Compute(instance_type=v["instance_type"], instance_count=int(v["instance_count"]),
                      volume_size_in_gb=int(v["volume_size"]), volume_kms_key_id=v.get("volume_kms_key"),
                      enable_managed_spot_training=bool(v["use_spot"]))
    stopping = StoppingCondition(max_runtime_in_seconds=int(v["max_run"]),
                                 max_wait_time_in_seconds=int(v["max_wait"]) if v["use_spot"] else None)
    out = v["output"].rstrip("/")
    trainer = ModelTrainer(
        sagemaker_session=session, role=v["role"], training_image=v["image_uri"],
        base_job_name="master-poc-preprocess", compute=compute, stopping_condition=stopping,
        # Spot restarts resume from the markers in --output; the checkpoint
        # channel only has to exist for managed spot.
        checkpoint_config=CheckpointConfig(s3_uri=f"{out}/_sagemaker/checkpoints", local_path="/opt/ml/checkpoints"),
        output_data_config=OutputDataConfig(s3_output_path=f"{out}/_sagemaker/output",
                                            kms_key_id=v.get("output_kms_key")),
        hyperparameters=hyperparameters(v),
        tags=[Tag(key=k, value=val) for k, val in v["tags"].items()] or None,
    )
    name = v.get("job_name") or f"master-poc-preprocess-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    core = trainer._create_training_job_args()
    wire = trainer._create_training_job_args(boto3=True)
    core["training_job_name"] = name
    wire["TrainingJobName"] = name
    return wire, core


def _session(region: str):
    import boto3
    from sagemaker.core.helper.session_helper import Session
    return Session(boto_session=boto3.session.Session(region_name=region))


def follow(client, name: str, poll_s: float = 30.0, out=None) -> int:
    """Prints status and secondary-status changes until the job ends."""
    out = out or sys.stdout
    seen = None
    while True:
        d = client.describe_training_job(TrainingJobName=name)
        state = (d["TrainingJobStatus"], d.get("SecondaryStatus"))
        if state != seen:
            msg = (d.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage", "")
            print(f"{time.strftime('%H:%M:%S')} {name}: {state[0]} / {state[1]} {msg}".rstrip(), file=out, flush=True)
            seen = state
        if state[0] in ("Completed", "Failed", "Stopped"):
            if state[0] == "Failed":
                print(f"failure reason: {d.get('FailureReason', '?')}", file=out)
            return 0 if state[0] == "Completed" else 1
        time.sleep(poll_s)  # polling a remote service, not synchronising tests


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        v = resolve(args)
    except LaunchError as e:
        print(f"master-poc-launch: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        # The SDK simulates the role's IAM policies in its constructor: an AWS call.
        os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    session = _session(v["region"])
    wire, core = build_request(v, session)
    if args.dry_run:
        print(json.dumps(wire, indent=2, sort_keys=True, default=str))
        return 0
    from sagemaker.core.resources import TrainingJob
    TrainingJob.create(session=session.boto_session, **core)
    name = core["training_job_name"]
    print(f"started training job {name} in {v['region']}: {v['instance_count']} x {v['instance_type']}"
          f"{' (spot)' if v['use_spot'] else ''}, cases {v['cases']} -> {v['output']}")
    print(f"follow: aws sagemaker describe-training-job --training-job-name {name} --region {v['region']}")
    if args.wait:
        return follow(session.boto_session.client("sagemaker"), name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
