"""SageMaker: the launcher through the real SDK v3 against moto's server,
and the bundled runner as two hosts sharing an S3 output."""
import json
import os
import subprocess
import sys

import psutil
import pytest

from conftest import examples_by_key, read_examples
from launch import entrypoint, launcher
from s3util import boto_client, download_prefix, s3_env, sample_on_s3
from transforms import spec

ROLE_TRUST = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]})


def launch_args(job_name, output="s3://sm-out/processed"):
    return ["--cases", "1-10,17,0022", "--instance-count", "3", "--instance-type", "ml.m5.xlarge",
            "--use-spot", "--max-run", "3600", "--max-wait", "7200",
            "--image-uri", "123456789012.dkr.ecr.us-east-1.amazonaws.com/master-poc:1.0.0",
            "--input", "s3://sm-in/vital", "--output", output, "--region", "us-east-1", "--job-name", job_name,
            "--tags", "project=master-poc,data=patient", "--hyperparameter", "horizon=5"]


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
    assert d["HyperParameters"]["cases"] == "1-10,17,0022"
    assert d["HyperParameters"]["input"] == "s3://sm-in/vital"
    assert d["HyperParameters"]["output"] == "s3://sm-out/processed"
    assert d["HyperParameters"]["horizon"] == "5"
    assert d["RoleArn"] == role
    # --dry-run printed exactly what was sent.
    for key in ("ResourceConfig", "StoppingCondition", "HyperParameters", "AlgorithmSpecification",
                "EnableManagedSpotTraining", "RoleArn", "CheckpointConfig", "TrainingJobName"):
        sent = d[key]
        shown = request[key]
        if isinstance(shown, dict):
            assert {k: sent.get(k) for k in shown} == shown, key
        else:
            assert sent == shown, key
    assert {t["Key"]: t["Value"] for t in request["Tags"]} == {"project": "master-poc", "data": "patient"}


@pytest.mark.parametrize("change,message", [
    ({"--max-wait": "3600"}, "must exceed --max-run"),
    ({"--instance-count": "0"}, "--instance-count must be at least 1"),
    ({"--cases": "1-5,x"}, "'x'"),
    ({"--output": "/local/out"}, "--output must be an s3:// prefix"),
    ({"--job-name": "bad_name!"}, "--job-name"),
])
def test_invalid_launcher_input_is_refused_before_any_aws_call(change, message, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: any call would fail
    args = launch_args("mpp-bad") + ["--role", "arn:aws:iam::123456789012:role/x"]
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    assert launcher.main(args) == 2
    assert message in capsys.readouterr().err


def test_launcher_config_file_and_flags_win(tmp_path):
    cfg = tmp_path / "launch.yaml"
    cfg.write_text("cases: 1-200\ninstance_count: 2\nmax_run: 7200\nimage_uri: img\nrole: arn:r\n"
                   "input: s3://a/in\noutput: s3://a/out\nregion: eu-north-1\n")
    v = launcher.resolve(launcher.build_parser().parse_args(["--config", str(cfg), "--instance-count", "4"]))
    assert v["instance_count"] == 4 and v["cases"] == "1-200" and v["max_wait"] == 14400 and v["use_spot"]
    v = launcher.resolve(launcher.build_parser().parse_args(["--config", str(cfg), "--no-spot"]))
    assert v["max_wait"] is None


def test_host_share_partitions_by_position():
    ids = [5, 1, 9, 22, 3, 7, 8]
    shares = [entrypoint.host_share(ids, i, 3) for i in range(3)]
    assert shares == [[5, 22, 8], [1, 3], [9, 7]]
    assert sorted(sum(shares, [])) == sorted(ids)


# ---- two hosts ------------------------------------------------------------------

N = 20


@pytest.fixture(scope="module")
def sm_data(moto_endpoint, tmp_path_factory):
    return sample_on_s3(moto_endpoint, str(tmp_path_factory.mktemp("sm-vital")), "sm-hosts", N, 1800)


def host_root(tmp_path, host, hp):
    root = tmp_path / host
    (root / "input/config").mkdir(parents=True)
    (root / "input/config/hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hp.items()}))
    (root / "input/config/resourceconfig.json").write_text(
        json.dumps({"current_host": host, "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}))
    return root


def start_host(root, moto_endpoint):
    env = dict(os.environ, **s3_env(), MASTER_POC_SM_ROOT=str(root), AWS_ENDPOINT_URL_S3=moto_endpoint)
    return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "master-poc-sagemaker"), "train"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def markers(c, prefix):
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket="sm-hosts", Prefix=f"{prefix}/cases/_done/"):
        for o in page.get("Contents", []):
            out[int(o["Key"].rsplit("/", 1)[1][:-5])] = json.loads(
                c.get_object(Bucket="sm-hosts", Key=o["Key"])["Body"].read())
    return out


def test_two_hosts_split_the_cases_and_the_leader_finalizes(moto_endpoint, sm_data, tmp_path):
    hp = {"cases": f"1-{N}", "input": sm_data, "output": "s3://sm-hosts/two", "leader_wait_s": 300,
          "poll_s": 0.5, "num_shards": 2}
    procs = {h: start_host(host_root(tmp_path, h, hp), moto_endpoint) for h in ("algo-1", "algo-2")}
    outs = {h: p.communicate(timeout=600)[0] for h, p in procs.items()}
    assert procs["algo-1"].returncode == 0, outs["algo-1"][-3000:]
    assert procs["algo-2"].returncode == 0, outs["algo-2"][-3000:]
    assert "host algo-1 (1 of 2): 10 of 20 cases" in outs["algo-1"]
    assert "progress:" in outs["algo-1"] and "progress:" in outs["algo-2"]
    c = boto_client(moto_endpoint)
    m = markers(c, "two")
    assert sorted(m) == list(range(1, N + 1))
    # Each case committed once, by the host that owns its position.
    assert all(m[cid]["host"] == ("algo-1" if (cid - 1) % 2 == 0 else "algo-2") for cid in m)
    assert "10 of 10 cases committed (0 were already)" in outs["algo-2"]
    meta = json.loads(c.get_object(Bucket="sm-hosts", Key="two/preprocessing_metadata.json")["Body"].read())
    assert meta["status"] == "complete" and meta["verification"]["ok"] and meta["cases"]["requested"] == N
    assert sum(meta["splits"][s]["windows"] for s in spec.SPLIT_NAMES) == sum(x["windows"] for x in m.values())


def test_a_killed_host_is_reported_and_a_restart_completes(moto_endpoint, sm_data, tmp_path):
    hp = {"cases": f"1-{N}", "input": sm_data, "output": "s3://sm-hosts/killed", "leader_wait_s": 8,
          "poll_s": 0.5, "progress_interval": 0.2}
    roots = {h: host_root(tmp_path / "first", h, hp) for h in ("algo-1", "algo-2")}
    p2 = start_host(roots["algo-2"], moto_endpoint)
    for line in p2.stdout:  # kill algo-2 (main, stage job, workers) once it has committed cases
        if line.startswith("progress:") and int(line.split()[1].split("/")[0]) >= 2:
            break
    fam = [psutil.Process(p2.pid)] + psutil.Process(p2.pid).children(recursive=True)
    for p in fam:
        p.kill()
    psutil.wait_procs(fam, timeout=30)
    p2.communicate()
    p1 = start_host(roots["algo-1"], moto_endpoint)
    out1 = p1.communicate(timeout=600)[0]
    assert p1.returncode == 1, out1[-3000:]
    failure = (roots["algo-1"] / "output/failure").read_text()
    assert "cases have no marker" in failure and "finalize" in failure
    c = boto_client(moto_endpoint)
    missing = sorted(set(range(1, N + 1)) - set(markers(c, "killed")))
    assert missing and all(cid % 2 == 0 for cid in missing) and len(missing) <= 8  # algo-2's unfinished cases
    assert str(missing[0]) in failure
    # Spot restart: both hosts run again and the job completes.
    hp["leader_wait_s"] = 300
    roots = {h: host_root(tmp_path / "again", h, hp) for h in ("algo-1", "algo-2")}
    procs = {h: start_host(roots[h], moto_endpoint) for h in roots}
    outs = {h: p.communicate(timeout=600)[0] for h, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outs
    assert "10 were already" in outs["algo-1"]
    assert f"{10 - len(missing)} were already" in outs["algo-2"]
    meta = json.loads(c.get_object(Bucket="sm-hosts", Key="killed/preprocessing_metadata.json")["Body"].read())
    assert meta["status"] == "complete" and meta["verification"]["ok"]
    files = download_prefix(c, "sm-hosts", "killed/", str(tmp_path), ".tfrecord.gz")
    ex = examples_by_key(read_examples([f for f in files if "__cases__" not in f]))
    assert sorted({k[0] for k in ex}) == list(range(1, N + 1))


def test_bad_job_configuration_writes_the_failure_file(tmp_path, monkeypatch):
    root = host_root(tmp_path, "algo-1", {"cases": "1-3,x", "input": "s3://a/in", "output": "s3://a/out"})
    monkeypatch.setenv("MASTER_POC_SM_ROOT", str(root))
    assert entrypoint.main(["train"]) == 2
    assert "'x'" in (root / "output/failure").read_text()
