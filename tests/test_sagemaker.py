"""SageMaker: the launcher through the real SDK v3 against moto's server,
and the bundled runner's entry point as SageMaker runs it."""
import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import examples_by_key, read_examples, run_cli
from s3util import boto_client, download_prefix, s3_env, sample_on_s3

from launch import entrypoint, launcher
from pipeline.run import coordination

ROLE_TRUST = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
BIN = os.path.dirname(sys.executable)


def launch_args(job_name, output="s3://sm-out/processed"):
    return ["--cases", "1-10,17,0022", "--instance-count", "3", "--instance-type", "ml.m5.xlarge",
            "--use-spot", "--max-run", "3600", "--max-wait", "7200",
            "--image-uri", "123456789012.dkr.ecr.us-east-1.amazonaws.com/master-poc:1.0.0",
            "--input", "s3://sm-in/vital", "--output", output, "--region", "us-east-1", "--job-name", job_name,
            "--tags", "project=master-poc,data=patient", "--hyperparameter", "horizon=5", "--emit-mask",
            "--subnets", "subnet-0a1,subnet-0b2", "--security-group-ids", "sg-0c3"]


def test_launcher_creates_the_job_and_dry_run_shows_what_is_sent(moto_endpoint, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")  # the emulator has no IAM policy simulation
    iam = boto_client(moto_endpoint, "iam")
    role = iam.create_role(RoleName="master-poc-sm", AssumeRolePolicyDocument=ROLE_TRUST)["Role"]["Arn"]
    args = launch_args("mpp-test-1") + ["--role", role]
    assert launcher.main(args + ["--dry-run"]) == 0
    request = json.loads(capsys.readouterr().out)
    assert launcher.main(args) == 0
    assert "started training job mpp-test-1" in capsys.readouterr().out
    d = boto_client(moto_endpoint, "sagemaker").describe_training_job(TrainingJobName="mpp-test-1")
    assert d["ResourceConfig"]["InstanceCount"] == 3 and d["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert d["EnableManagedSpotTraining"] is True
    assert d["StoppingCondition"]["MaxRuntimeInSeconds"] == 3600
    assert d["StoppingCondition"]["MaxWaitTimeInSeconds"] == 7200
    assert d["AlgorithmSpecification"]["TrainingImage"].endswith("master-poc:1.0.0")
    assert d["HyperParameters"] == {"cases": "1-10,17,0022", "input": "s3://sm-in/vital",
                                    "output": "s3://sm-out/processed", "horizon": "5", "emit_mask": "true"}
    assert d["VpcConfig"] == {"Subnets": ["subnet-0a1", "subnet-0b2"], "SecurityGroupIds": ["sg-0c3"]}
    assert d["RoleArn"] == role
    # --dry-run printed exactly what was sent.
    for key in ("ResourceConfig", "StoppingCondition", "HyperParameters", "AlgorithmSpecification",
                "EnableManagedSpotTraining", "RoleArn", "CheckpointConfig", "TrainingJobName", "VpcConfig"):
        sent = d[key]
        shown = request[key]
        if isinstance(shown, dict):
            assert {k: sent.get(k) for k in shown} == shown, key
        else:
            assert sent == shown, key
    assert {t["Key"]: t["Value"] for t in request["Tags"]} == {"project": "master-poc", "data": "patient"}
    # What the container will read back is the request the launcher checked.
    hp_req = entrypoint.request_for_host(d["HyperParameters"], "algo-2", ["algo-1", "algo-2", "algo-3"])
    assert hp_req.settings.horizon == 5 and hp_req.settings.emit_mask and str(hp_req.options.share) == "2/3"


def test_the_launcher_takes_the_open_dataset_as_input(capsys, monkeypatch):
    """A 3000-case job with no input bucket: every instance reads VitalDB's web API."""
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    args = launch_args("mpp-vitaldb") + ["--role", "arn:aws:iam::123456789012:role/x", "--dry-run"]
    args[args.index("--input") + 1] = "vitaldb"
    args[args.index("--cases") + 1] = "1-3000"
    assert launcher.main(args) == 0
    hp = json.loads(capsys.readouterr().out)["HyperParameters"]
    assert hp["input"] == "vitaldb" and hp["cases"] == "1-3000"
    req = entrypoint.request_for_host(hp, "algo-1", ["algo-1"])
    assert req.options.input == "vitaldb"


@pytest.mark.parametrize("change,message", [
    ({"--max-wait": "3600"}, "must exceed --max-run"),
    ({"--instance-count": "0"}, "instance_count '0': must be a positive integer"),
    ({"--cases": "1-5,x"}, "'x'"),
    ({"--output": "/local/out"}, "--output must be an s3:// prefix"),
    ({"--input": "/local/in"}, "--input must be an s3:// prefix, an https:// base URL or 'vitaldb'"),
    ({"--input": "vitaldb", "--clinical": "/local/c.csv"}, "--clinical must be on s3:// or https://"),
    ({"--job-name": "bad_name!"}, "--job-name"),
    ({"--security-group-ids": ""}, "--subnets and --security-group-ids go together"),
    ({"--hyperparameter": "windw=600"}, "unknown hyperparameter(s) ['windw']"),
    ({"--hyperparameter": "window=0"}, "window '0': must be a positive integer"),
    ({"--hyperparameter": "share=1/2"}, "unknown hyperparameter(s) ['share']"),
])
def test_invalid_launcher_input_is_refused_before_any_aws_call(change, message, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: any call would fail
    args = launch_args("mpp-bad") + ["--role", "arn:aws:iam::123456789012:role/x"]
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert launcher.main(args) == 2
    assert message in capsys.readouterr().err


def test_launcher_config_file_takes_every_documented_key_and_flags_win(tmp_path, capsys, monkeypatch):
    """Every key the README documents for launch.yaml, the job's options at
    the top level and in a hyperparameters: block."""
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    cfg = tmp_path / "launch.yaml"
    cfg.write_text("""
cases: 1-200
instance_count: 2
instance_type: ml.m5.xlarge
use_spot: true
max_run: 7200
max_wait: 10000
volume_size: 80
image_uri: 123456789012.dkr.ecr.eu-north-1.amazonaws.com/master-poc:1.0.0
role: arn:aws:iam::123456789012:role/r
region: eu-north-1
job_name: mpp-config
tags: {project: master-poc}
volume_kms_key: kms-vol
output_kms_key: kms-out
subnets: [subnet-1, subnet-2]
security_group_ids: sg-1
input: s3://a/in
clinical: s3://a/in/clinical_data.csv
output: s3://a/out
num_shards: 4
window: 600
hyperparameters:
  crop_anaesthesia: true
  emit_mask: true
  leader_wait_s: 7200
  beam_args: --direct_running_mode=multi_processing
""")
    v = launcher.resolve(launcher.build_parser().parse_args(["--config", str(cfg), "--instance-count", "4",
                                                             "--window", "900"]))
    lo = v.launch
    assert (lo.instance_count, lo.instance_type, lo.use_spot, lo.max_run, v.max_wait, lo.volume_size) == \
        (4, "ml.m5.xlarge", True, 7200, 10000, 80)
    assert (lo.job_name, lo.tags, lo.volume_kms_key, lo.output_kms_key) == ("mpp-config", {"project": "master-poc"},
                                                                            "kms-vol", "kms-out")
    assert lo.subnets == ("subnet-1", "subnet-2") and lo.security_group_ids == ("sg-1",)
    assert v.hyperparameters == {"cases": "1-200", "input": "s3://a/in", "clinical": "s3://a/in/clinical_data.csv",
                                    "output": "s3://a/out", "num_shards": "4", "window": "900",
                                    "crop_anaesthesia": "true", "emit_mask": "true", "leader_wait_s": "7200.0",
                                    "beam_args": "--direct_running_mode=multi_processing"}
    v = launcher.resolve(launcher.build_parser().parse_args(["--config", str(cfg), "--no-spot"]))
    assert v.max_wait is None
    wire, _ = launcher.build_request(v)
    assert wire["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
    cfg.write_text(cfg.read_text() + "hyperparamters: {}\n")
    assert launcher.main(["--config", str(cfg), "--dry-run"]) == 2
    assert "unknown options ['hyperparamters']" in capsys.readouterr().err


def test_shares_partition_by_position():
    ids = [5, 1, 9, 22, 3, 7, 8]
    shares = [coordination.Share(i, 3).select(ids) for i in (1, 2, 3)]
    assert shares == [[5, 22, 8], [1, 3], [9, 7]]
    assert sorted(sum(shares, [])) == sorted(ids)
    assert coordination.Share.parse(" 2/3 ") == coordination.Share(2, 3)
    for bad in ("0/3", "4/3", "2", "a/b", "1/0"):
        with pytest.raises(ValueError):
            coordination.Share.parse(bad)


def test_the_leaders_wait_is_bounded_and_stops_on_a_signal(tmp_path):
    """The wait's clock and sleep are injected: no real waiting here."""
    from pipeline.output import storage
    out = str(tmp_path)
    storage.write_json(storage.marker_path(out, storage.DONE, 1), {"case_id": 1})
    storage.write_json(storage.marker_path(out, storage.FAILED, 2), {"case_id": 2, "reason": "x", "detail": ""})
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s
    said = []
    missing = coordination.wait_for_markers(out, [1, 2, 3, 4], wait_s=100, poll_s=30, say=said.append,
                                            clock=lambda: now[0], sleep=sleep)
    assert missing == [3, 4] and slept == [30, 30, 30, 10] and \
        said[0] == "leader: waiting for 2 cases from the other shares"
    assert coordination.wait_for_markers(out, [1, 2, 3], 100, 30, stopping=lambda: True, say=said.append) == [3]
    assert coordination.wait_for_markers(out, [1, 2], 100, 30, say=said.append) == []


# ---- the bundled runner, as SageMaker starts it ------------------------------------

N = 12


@pytest.fixture(scope="module")
def sm_data(moto_endpoint, tmp_path_factory):
    return sample_on_s3(moto_endpoint, str(tmp_path_factory.mktemp("sm-vital")), "sm-hosts", N, 1200)


def host_root(tmp_path, host, hp, hosts=("algo-1", "algo-2")):
    root = tmp_path / host
    (root / "input/config").mkdir(parents=True)
    (root / "input/config/hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hp.items()}))
    (root / "input/config/resourceconfig.json").write_text(
        json.dumps({"current_host": host, "hosts": list(hosts), "network_interface_name": "eth0"}))
    return root


def host_env(root, moto_endpoint):
    return dict(os.environ, **s3_env(), MASTER_POC_SM_ROOT=str(root), AWS_ENDPOINT_URL_S3=moto_endpoint)


def markers(c, prefix):
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket="sm-hosts", Prefix=f"{prefix}/cases/_done/"):
        for o in page.get("Contents", []):
            out[int(o["Key"].rsplit("/", 1)[1][:-5])] = json.loads(
                c.get_object(Bucket="sm-hosts", Key=o["Key"])["Body"].read())
    return out


def test_a_leader_without_its_second_host_names_the_missing_cases_and_the_command_that_completes_the_job(
        moto_endpoint, sm_data, tmp_path, monkeypatch, capsys):
    """algo-2 never ran (a host lost before its first commit): algo-1
    commits its share, does not wait (leader_wait_s 0), and its failure
    message names algo-2's cases and the command that finishes the job; the
    command, run as printed, completes it."""
    hp = {"cases": f"1-{N}", "input": sm_data, "output": "s3://sm-hosts/lost", "leader_wait_s": 0,
          "horizon": 2, "beam_args": "--direct_running_mode=in_memory"}
    root = host_root(tmp_path, "algo-1", hp)
    res = subprocess.run([os.path.join(BIN, "master-poc-sagemaker"), "train"], capture_output=True, text=True,
                         env=host_env(root, moto_endpoint), timeout=600)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"host algo-1 (1 of 2): {N // 2} of {N} cases" in res.stdout
    failure = (root / "output/failure").read_text()
    even = list(range(2, N + 1, 2))
    assert f"{len(even)} cases have no marker after 0 s: {even}" in failure
    c = boto_client(moto_endpoint)
    assert sorted(markers(c, "lost")) == list(range(1, N + 1, 2))
    assert all(m["host"] == "algo-1" for m in markers(c, "lost").values())
    cmd = failure.split("To complete the job (committed cases are skipped): ", 1)[1]
    assert "--horizon 2" in cmd  # the job's data settings, or the output would refuse the run
    argv = shlex.split(cmd)
    assert argv[0] == "master-poc-preprocess"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    assert run_cli(*argv[1:], "--direct_running_mode=in_memory") == 0  # the command as printed, in this process
    assert f"{N // 2} skipped (already committed)" in capsys.readouterr().out
    meta = json.loads(c.get_object(Bucket="sm-hosts", Key="lost/preprocessing_metadata.json")["Body"].read())
    assert meta["status"] == "complete" and meta["verification"]["ok"] and meta["cases"]["requested"] == N
    assert meta["settings"]["horizon"] == 2
    files = download_prefix(c, "sm-hosts", "lost/", str(tmp_path), ".tfrecord.gz")
    ex = examples_by_key(read_examples([f for f in files if "__cases__" not in f]))
    assert sorted({k[0] for k in ex}) == list(range(1, N + 1))


def test_bad_job_configuration_writes_the_failure_file(tmp_path, monkeypatch):
    root = host_root(tmp_path, "algo-1", {"cases": "1-3,x", "input": "s3://a/in", "output": "s3://a/out"})
    monkeypatch.setenv("MASTER_POC_SM_ROOT", str(root))
    assert entrypoint.main(["train"]) == 2
    assert "'x'" in (root / "output/failure").read_text()
    root = host_root(tmp_path / "b", "algo-1", {"cases": "1-3", "input": "s3://a/in", "output": "s3://a/out",
                                                 "windows": "600"})
    monkeypatch.setenv("MASTER_POC_SM_ROOT", str(root))
    assert entrypoint.main(["train"]) == 2
    assert "unknown option(s) windows" in (root / "output/failure").read_text()


def test_a_host_reads_the_open_dataset_from_the_web_api(moto_endpoint, tmp_path):
    """The entry point as SageMaker runs it, one host, --input vitaldb: the
    cases come from the (stand-in) web API, the output goes to S3."""
    from webstandin import StandIn

    from pipeline.io.sources import VITALDB_API_ENV
    from pipeline.tools import sample
    folder = tmp_path / "api"
    sample.write_sample(str(folder), [1, 2, 3], 900, waveforms=True)
    boto_client(moto_endpoint).create_bucket(Bucket="sm-web")
    hp = {"cases": "1-3", "input": "vitaldb", "output": "s3://sm-web/out",
          "beam_args": "--direct_running_mode=in_memory"}
    root = host_root(tmp_path, "algo-1", hp, hosts=("algo-1",))
    with StandIn(str(folder)) as api:
        res = subprocess.run([os.path.join(BIN, "master-poc-sagemaker"), "train"], capture_output=True, text=True,
                             env=dict(host_env(root, moto_endpoint), **{VITALDB_API_ENV: api.url}), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [p for m, p, _ in api.log if m == "GET"].count("/cases") == 1
    meta = json.loads(boto_client(moto_endpoint).get_object(Bucket="sm-web", Key="out/preprocessing_metadata.json")
                      ["Body"].read())
    assert meta["status"] == "complete" and meta["cases"]["ok"] == [1, 2, 3]
    assert meta["source"]["dataset"] == "VitalDB open dataset 1.0.1" and meta["transfer"]["cases"] == 3


def test_the_cohort_travels_to_the_instances_as_a_hyperparameter(capsys, monkeypatch):
    """The criteria, in the order given, reach every host; the launcher refuses a bad one before any call."""
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    args = launch_args("mpp-cohort") + ["--role", "arn:aws:iam::123456789012:role/x", "--dry-run",
                                        "--include", "age >= 18", "--require", "Propofol_INF,BP_MAP",
                                        "--exclude", "department == 'Urology'", "--min-measured", "BP_MAP=0.3"]
    assert launcher.main(args) == 0
    hp = json.loads(capsys.readouterr().out)["HyperParameters"]
    assert json.loads(hp["cohort"]) == [{"include": "age >= 18"}, {"require": "Propofol_INF,BP_MAP"},
                                        {"exclude": "department == 'Urology'"}, {"min_measured": "BP_MAP=0.3"}]
    req = entrypoint.request_for_host(hp, "algo-2", ["algo-1", "algo-2"])
    assert [(c.kind, c.text) for c in req.options.cohort] == [
        ("include", "age >= 18"), ("require", "Propofol_INF,BP_MAP"), ("exclude", "department == 'Urology'"),
        ("min_measured", "BP_MAP=0.3")]
    bad = launch_args("mpp-cohort") + ["--role", "arn:aws:iam::123456789012:role/x", "--dry-run",
                                       "--min-measured", "BP_MAP=2"]
    assert launcher.main(bad) == 2
    assert "--min-measured 'BP_MAP=2': the fraction 2 is outside [0, 1]" in capsys.readouterr().err
