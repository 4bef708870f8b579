"""master-poc-launch: start the preprocessing as a SageMaker training job.

    master-poc-launch --cases 1-3000 --instance-count 6 --use-spot \\
        --image-uri 123456789012.dkr.ecr.eu-north-1.amazonaws.com/master-poc:1.0.0 \\
        --role arn:aws:iam::123456789012:role/master-poc-preprocess \\
        --input s3://bucket/vital --output s3://bucket/processed/run-1 --region eu-north-1 --wait

--input vitaldb reads VitalDB's open dataset from its web API on every
instance (no input bucket; the instances must reach the internet: in a VPC,
through a NAT gateway).

The job's own options are the main command's (`master-poc-preprocess
--help`): every data setting and run option can be given as a flag here
(--horizon 5, --emit-mask, --num-shards 4, ...), in a YAML --config file
under the same names (the file `master-poc-preprocess --config` reads), in
its `hyperparameters:` block, or with --hyperparameter KEY=VALUE; each is
checked by the same declaration the container parses it with. Flags win
over the file. Everything is validated before any AWS call. --dry-run prints
the CreateTrainingJob request as JSON and calls nothing. The request is
built by the SageMaker Python SDK v3 (`sagemaker.train.ModelTrainer` with
Compute, StoppingCondition, CheckpointConfig, OutputDataConfig, Networking)
and sent as built, so what --dry-run prints is what is sent.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from launch.entrypoint import NOT_HYPERPARAMETERS, REQUIRED
from pipeline.io import sources
from pipeline.io.sources import Source
from pipeline.options import SAGEMAKER_SECTION, RunOptions, read_config, request_from_mapping
from transforms.settings import (
    OptionError,
    Settings,
    add_flags,
    declared,
    from_mapping,
    option,
    parse_bool,
    positive_int,
    text_value,
)

_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def _csv(value) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(v).strip() for v in items if str(v).strip())


def _tags(value) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    tags = {}
    for part in filter(None, str(value).split(",")):
        if "=" not in part:
            raise ValueError(f"{part!r} is not key=value")
        k, v = part.split("=", 1)
        tags[k.strip()] = v.strip()
    return tags


@dataclass(frozen=True)
class LaunchOptions:
    """The training job itself (not the preprocessing's options)."""

    instance_count: int = option(1, "instances (hosts); each takes its share of the cases", parse=positive_int)
    instance_type: str = option("ml.m5.2xlarge", "instance type")
    use_spot: bool = option(True, "managed spot training (--no-spot for on-demand)", parse=parse_bool)
    max_run: int = option(93600, "seconds the job may run", parse=positive_int)
    max_wait: Optional[int] = option(None, "seconds, spot only (default 2 x max-run; must exceed it)",
                                     parse=positive_int)
    volume_size: int = option(50, "GB of EBS per instance", parse=positive_int)
    image_uri: Optional[str] = option(None, "the pushed Docker image (see README)")
    role: Optional[str] = option(None, "IAM role ARN the job runs as")
    region: Optional[str] = option(None, "AWS region")
    job_name: Optional[str] = option(None, "default: master-poc-preprocess-<timestamp>")
    tags: Optional[dict] = option(None, "key=value,key2=value2", parse=_tags, dump=dict)
    volume_kms_key: Optional[str] = option(None, "KMS key for the instances' storage volumes")
    output_kms_key: Optional[str] = option(None, "KMS key for the job's output")
    subnets: tuple = option((), "VPC subnet ids, comma-separated (with --security-group-ids: run in your VPC)",
                            parse=_csv, dump=list)
    security_group_ids: tuple = option((), "VPC security group ids, comma-separated (with --subnets)",
                                       parse=_csv, dump=list)


# The job's options a launch may set: the data settings and the run options
# that mean something on SageMaker.
JOB_FIELDS = [f for f in declared(Settings)] + [f for f in declared(RunOptions) if f.name not in NOT_HYPERPARAMETERS]
JOB_NAMES = {f.name for f in JOB_FIELDS} | {"beam_args"}
LAUNCH_NAMES = {f.name for f in declared(LaunchOptions)}


class LaunchError(Exception):
    """Invalid launcher input, said before any AWS call."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="master-poc-launch", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file: any option below (underscored names), the job's options, and a "
                                     "hyperparameters: block; flags win")
    g = ap.add_argument_group("the training job")
    for f in declared(LaunchOptions):
        if f.name == "use_spot":
            spot = g.add_mutually_exclusive_group()
            spot.add_argument("--use-spot", dest="use_spot", action="store_const", const=True, default=None,
                              help=f.metadata["help"])
            spot.add_argument("--no-spot", dest="use_spot", action="store_const", const=False)
        else:
            add_flags(g, [f])
    j = ap.add_argument_group("the job's options (as master-poc-preprocess; sent as hyperparameters)")
    add_flags(j, JOB_FIELDS)
    j.add_argument("--beam-args", dest="beam_args", default=None, help="extra Beam flags for every host, one string")
    ap.add_argument("--hyperparameter", action="append", default=[], metavar="KEY=VALUE",
                    help="a job option by name (window=600, num_shards=4, ...)")
    ap.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request; call nothing")
    ap.add_argument("--wait", action="store_true", help="follow the job and exit with its outcome")
    e = ap.add_argument_group("estimate instead of launching (launch/estimate.py)")
    e.add_argument("--estimate-from", metavar="OUTPUT", help="a finished pilot output (local or s3://): print the "
                                                             "job's time and cost for --cases, type and count")
    e.add_argument("--target-hours", type=float, help="also suggest the instance count for this wall time")
    e.add_argument("--price-per-hour", type=float, help="on-demand $ per instance-hour (default: the shipped table)")
    e.add_argument("--vcpus", type=int, help="vCPUs of the instance type (default: the shipped table)")
    e.add_argument("--worker-efficiency", type=float, default=None,
                   help="rate per worker kept at each doubling of the workers (default 0.975, measured 1 -> 2)")
    return ap


@dataclass(frozen=True)
class LaunchPlan:
    """A validated launch: the training job's options, the spot wait (None
    on demand) and the job's options as SageMaker hyperparameters (text)."""

    launch: LaunchOptions
    max_wait: Optional[int]
    hyperparameters: dict


def _gather(args: argparse.Namespace) -> tuple[LaunchOptions, dict, list[str]]:
    """Flags over the YAML config over defaults: the launch options, the
    job's options, and what is wrong with them so far."""
    src = f"--config {args.config}" if args.config else ""
    try:  # the file the main command reads too; the launcher's own options also at its top level
        cfg, section = read_config(args.config) if args.config else ({}, {})
    except OptionError as e:
        raise LaunchError(str(e)) from None
    bad = sorted(set(section) - LAUNCH_NAMES)
    if bad:
        raise LaunchError(f"{src}: {SAGEMAKER_SECTION}: unknown options {bad} (the launcher's: {sorted(LAUNCH_NAMES)})")
    cfg.update(section)
    unknown = sorted(set(cfg) - LAUNCH_NAMES - JOB_NAMES)
    if unknown:
        raise LaunchError(f"{src}: unknown options {unknown} (the job's options: {sorted(JOB_NAMES)}; "
                          f"the launcher's: {sorted(LAUNCH_NAMES)})")
    problems = []
    flags = {k: v for k, v in vars(args).items() if v is not None}
    launch_values = {k: v for k, v in cfg.items() if k in LAUNCH_NAMES}
    launch_values.update({k: v for k, v in flags.items() if k in LAUNCH_NAMES})
    job: dict[str, Any] = {k: v for k, v in cfg.items() if k in JOB_NAMES}
    for item in args.hyperparameter:
        if "=" not in item:
            problems.append(f"--hyperparameter {item!r} is not KEY=VALUE")
        else:
            k, val = item.split("=", 1)
            job[k.strip()] = val
    job.update({k: v for k, v in flags.items() if k in JOB_NAMES})
    try:
        lo = from_mapping(LaunchOptions, launch_values, src or "launcher")
    except OptionError as e:
        raise LaunchError(str(e)) from None
    bad_job = sorted(set(job) - JOB_NAMES)
    if bad_job:
        problems.append(f"unknown hyperparameter(s) {bad_job} (known: {sorted(JOB_NAMES)})")
        job = {k: v for k, v in job.items() if k in JOB_NAMES}
    return lo, job, problems


def resolve(args: argparse.Namespace) -> LaunchPlan:
    """Flags over the YAML config over defaults; validated. Raises LaunchError."""
    lo, job, problems = _gather(args)
    try:  # the container parses them with the same declaration
        req = request_from_mapping(job, "job options")
    except (OptionError, ValueError) as e:  # a track map's own errors are ValueErrors too
        problems.append(str(e))
        req = None
    for key in REQUIRED:
        if not job.get(key):
            problems.append(f"--{key} is required")
    if job.get("output") and not str(job["output"]).startswith("s3://"):
        problems.append(f"--output must be an s3:// prefix for SageMaker (got {job['output']!r})")
    # Inputs the instances can reach: an object store, or a web server (VitalDB's open dataset, a mirror).
    if job.get("input") and not _remote(str(job["input"])):
        problems.append(f"--input must be an s3:// prefix, an https:// base URL or 'vitaldb' for SageMaker "
                        f"(got {job['input']!r})")
    if job.get("clinical") and not _remote(str(job["clinical"]), table=True):
        problems.append(f"--clinical must be on s3:// or https:// (got {job['clinical']!r})")
    for key in ("image_uri", "role", "region"):
        if not getattr(lo, key):
            problems.append(f"--{key.replace('_', '-')} is required")
    max_wait = lo.max_wait
    if lo.use_spot:
        max_wait = max_wait or 2 * lo.max_run
        if max_wait <= lo.max_run:
            problems.append(f"with spot, --max-wait ({max_wait}) must exceed --max-run ({lo.max_run})")
    else:
        max_wait = None
    if lo.job_name and not _JOB_NAME.match(lo.job_name):
        problems.append(f"--job-name {lo.job_name!r}: 1-63 letters, digits and hyphens")
    if bool(lo.subnets) != bool(lo.security_group_ids):
        problems.append("--subnets and --security-group-ids go together: give both to run in a VPC, or neither")
    if problems:
        raise LaunchError("; ".join(problems))
    return LaunchPlan(lo, max_wait, hyperparameters(req, job))


def _remote(location: str, table: bool = False) -> bool:
    """Whether the instances can read it: not a path on this machine."""
    try:
        return not sources.is_local(location) if table else Source.for_location(location).kind != "folder"
    except ValueError:  # a filesystem Beam does not know
        return False


HYPERPARAMETER_MAX = 2500  # characters per value, SageMaker's limit


def _portable(name: str, given) -> bool:
    """A value the container can read as given: an s3:// path or a shipped track map's name."""
    from transforms import trackmap
    return name == "tracks" and isinstance(given, str) and (given.startswith("s3://") or given in trackmap.shipped())


def hyperparameters(req, given: dict) -> dict[str, str]:
    """The given job options as SageMaker hyperparameters (strings), in the
    form the container's declaration reads back. A track map from a local
    file travels as its content (JSON)."""
    hp = {}
    by_name = {f.name: f for f in JOB_FIELDS}
    for name, raw in given.items():
        if name == "beam_args":
            hp[name] = " ".join(req.beam_args)
            continue
        if _portable(name, raw):
            hp[name] = raw
            continue
        value = getattr(req.settings if name in {x.name for x in declared(Settings)} else req.options, name)
        hp[name] = text_value(by_name[name], value)
        if len(hp[name]) > HYPERPARAMETER_MAX:
            raise LaunchError(f"{name} is {len(hp[name])} characters as a hyperparameter (SageMaker takes "
                              f"{HYPERPARAMETER_MAX}): put the file on S3 and give its s3:// path")
    return hp


def build_request(plan: LaunchPlan, session=None) -> tuple[dict, dict]:
    """The CreateTrainingJob request, in boto3 form (printed) and in
    sagemaker-core form (sent), both from one ModelTrainer."""
    from sagemaker.core.training.configs import (
        CheckpointConfig,
        Compute,
        Networking,
        OutputDataConfig,
        StoppingCondition,
        Tag,
    )
    from sagemaker.train import ModelTrainer
    lo, hp = plan.launch, plan.hyperparameters
    compute = Compute(instance_type=lo.instance_type, instance_count=lo.instance_count,
                      volume_size_in_gb=lo.volume_size, volume_kms_key_id=lo.volume_kms_key,
                      enable_managed_spot_training=lo.use_spot)
    stopping = StoppingCondition(max_runtime_in_seconds=lo.max_run, max_wait_time_in_seconds=plan.max_wait)
    out = hp["output"].rstrip("/")
    networking = (Networking(subnets=list(lo.subnets), security_group_ids=list(lo.security_group_ids))
                  if lo.subnets else None)
    trainer = ModelTrainer(
        sagemaker_session=session, role=lo.role, training_image=lo.image_uri,
        base_job_name="master-poc-preprocess", compute=compute, stopping_condition=stopping,
        # Spot restarts resume from the markers in --output; the checkpoint
        # channel only has to exist for managed spot.
        checkpoint_config=CheckpointConfig(s3_uri=f"{out}/_sagemaker/checkpoints", local_path="/opt/ml/checkpoints"),
        output_data_config=OutputDataConfig(s3_output_path=f"{out}/_sagemaker/output", kms_key_id=lo.output_kms_key),
        networking=networking,
        hyperparameters=hp,
        tags=[Tag(key=k, value=val) for k, val in (lo.tags or {}).items()] or None,
    )
    name = lo.job_name or f"master-poc-preprocess-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
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


def run_estimate(args: argparse.Namespace) -> int:
    """--estimate-from: the job's time and cost from a pilot output; launches nothing."""
    from launch import estimate as est
    from pipeline.run import runtime
    from transforms.case_ids import parse_cases
    lo, job, problems = _gather(args)
    if not job.get("cases"):
        problems.append("--cases is required: the job's case count")
    if problems:
        raise LaunchError("; ".join(problems))
    try:
        n = len(parse_cases(str(job["cases"])))
    except ValueError as e:
        raise LaunchError(f"--cases {job['cases']!r}: {e}") from None
    runtime.setup_io(shlex_split(job.get("beam_args")))  # before the pilot output is read
    kw = {"price_per_hour": args.price_per_hour, "vcpus": args.vcpus}
    if args.worker_efficiency is not None:
        kw["efficiency"] = args.worker_efficiency
    try:
        pilot = est.read_pilot(args.estimate_from)
        e = est.estimate(pilot, n, lo.instance_count, lo.instance_type, **kw)
        target = args.target_hours * 3600 if args.target_hours else None
        best = est.suggest_hosts(pilot, n, lo.instance_type, target, **kw) if target else None
    except est.EstimateError as err:
        raise LaunchError(str(err)) from None
    for line in est.report(pilot, e, lo.use_spot, est.price_table(), best, target):
        print(line)
    return 0


def shlex_split(text) -> list[str]:
    import shlex
    return shlex.split(text) if isinstance(text, str) else list(text or [])


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.estimate_from:
        try:
            return run_estimate(args)
        except LaunchError as e:
            print(f"master-poc-launch: error: {e}", file=sys.stderr)
            return 2
    try:
        plan = resolve(args)
    except LaunchError as e:
        print(f"master-poc-launch: error: {e}", file=sys.stderr)
        return 2
    lo = plan.launch
    if args.dry_run:
        # The SDK simulates the role's IAM policies in its constructor: an AWS call.
        os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    session = _session(lo.region)
    wire, core = build_request(plan, session)
    if args.dry_run:
        print(json.dumps(wire, indent=2, sort_keys=True, default=str))
        return 0
    from sagemaker.core.resources import TrainingJob
    TrainingJob.create(session=session.boto_session, **core)
    name = core["training_job_name"]
    hp = plan.hyperparameters
    print(f"started training job {name} in {lo.region}: {lo.instance_count} x {lo.instance_type}"
          f"{' (spot)' if lo.use_spot else ''}, cases {hp['cases']} -> {hp['output']}")
    print(f"follow: aws sagemaker describe-training-job --training-job-name {name} --region {lo.region}")
    if args.wait:
        return follow(session.boto_session.client("sagemaker"), name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
