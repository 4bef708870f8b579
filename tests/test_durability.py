"""Nothing lost, nothing counted twice: kill -9 at several moments (with real
Beam worker processes, multi_processing), SIGTERM with drain and with the
grace period running out, all on S3 (moto's server), through the console
script as a user runs it."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import INMEM, assert_same_examples, examples_by_key, read_examples, run_cli
from s3util import beam_s3_args, boto_client, download_prefix, s3_env, sample_on_s3

from pipeline.options import EXIT_INTERRUPTED
from transforms import spec

N_CASES = 12
CLI = os.path.join(os.path.dirname(sys.executable), "master-poc-preprocess")


@pytest.fixture(scope="module")
def s3_thirty(moto_endpoint, tmp_path_factory):
    """12 generated 25-minute cases on S3 and the examples of one uninterrupted run."""
    local = str(tmp_path_factory.mktemp("twelve"))
    src = sample_on_s3(moto_endpoint, local, "durability", N_CASES, 1500)
    ref_out = str(tmp_path_factory.mktemp("ref"))
    assert run_cli("--input", local, "--output", ref_out, "--direct_running_mode=in_memory") == 0
    from pipeline.output import storage
    ref = examples_by_key(read_examples(
        [f for s in spec.SPLIT_NAMES for f in storage.list_files(f"{ref_out}/{s}/*.tfrecord.gz")]))
    return src, ref


def start(src, out, endpoint, *extra, mode="--direct_num_workers=2"):
    return subprocess.Popen(
        [CLI, "--input", src, "--output", out, mode, "--progress-interval", "0.2", *extra]
        + beam_s3_args(endpoint),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **s3_env()),
        start_new_session=True)


def wait_for_line(proc, pred, log):
    """Reads the job's own output until a line satisfies pred (no sleeps)."""
    for line in proc.stdout:
        log.append(line)
        if pred(line):
            return line
    raise AssertionError("job ended before the expected line:\n" + "".join(log[-30:]))


def done_at_least(k):
    return lambda line: line.startswith("progress:") and int(line.split()[1].split("/")[0]) >= k


def family(proc):
    p = psutil.Process(proc.pid)
    return [p] + p.children(recursive=True)


def kill9_all(proc):
    procs = family(proc)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.stdout.read()
    proc.wait()
    return len(procs)


def read_output(client, bucket, prefix, tmp):
    out = {}
    for s in spec.SPLIT_NAMES:
        d = tmp / f"{prefix.replace('/', '_')}-{s}"
        d.mkdir(exist_ok=True)
        out.update(examples_by_key(read_examples(download_prefix(client, bucket, f"{prefix}/{s}/", str(d),
                                                                 ".tfrecord.gz"))))
    return out


def test_kill_9_at_many_moments_then_rerun_equals_one_clean_run(moto_endpoint, s3_thirty, tmp_path):
    src, ref = s3_thirty
    out = "s3://durability/killed"
    kill_points = [("stage 1 running, no case done", lambda line: line.startswith("progress: 0/")),
                   ("after >= 5 cases", done_at_least(5)),
                   ("during stage 2, one shard written", lambda line: line.startswith("stage 2: wrote"))]
    survived = []
    for name, pred in kill_points:
        log = []
        proc = start(src, out, moto_endpoint, "--num-shards", "3")
        line = wait_for_line(proc, pred, log)
        n = kill9_all(proc)
        survived.append((name, line.strip(), n))
    print("kill points:", *survived, sep="\n  ")
    # The rerun (in this process: the same command and code, no process start-up).
    assert run_cli("--input", src, "--output", out, "--num-shards", "3", INMEM, *beam_s3_args(moto_endpoint)) == 0
    c = boto_client(moto_endpoint)
    meta = json.loads(c.get_object(Bucket="durability", Key="killed/preprocessing_metadata.json")["Body"].read())
    assert meta["status"] == "complete" and meta["verification"]["ok"]  # no duplicates, counts = markers
    assert_same_examples(read_output(c, "durability", "killed", tmp_path), ref)
    assert all(n >= 2 for _, _, n in survived)  # main + the stage job (+ workers) were killed each time


def test_sigterm_drains_and_a_rerun_completes(moto_endpoint, s3_thirty, tmp_path, capsys):
    src, ref = s3_thirty
    out = "s3://durability/sigterm"
    log = []
    proc = start(src, out, moto_endpoint, "--shutdown-grace", "30", mode=INMEM)
    wait_for_line(proc, done_at_least(4), log)
    procs = family(proc)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    elapsed = time.monotonic() - t
    print(f"SIGTERM: exit {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode == EXIT_INTERRUPTED, rest[-3000:]
    # Drained, not killed: the cases in flight finished within the grace period.
    assert "received SIGTERM" in rest and "stopped by SIGTERM; rerun the same command" in rest
    assert "killed" not in rest
    psutil.wait_procs(procs, timeout=15)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # no orphans
    c = boto_client(moto_endpoint)
    meta = json.loads(c.get_object(Bucket="durability", Key="sigterm/preprocessing_metadata.json")["Body"].read())
    assert meta["status"] == "incomplete"
    committed = meta["cases"]["ok"]
    assert len(committed) >= 4 and meta["cases"]["not_done"]
    assert sorted(committed + meta["cases"]["not_done"]) == list(range(1, N_CASES + 1))
    for cid in committed:  # every committed case has its complete object
        m = json.loads(c.get_object(Bucket="durability", Key=f"sigterm/cases/_done/{cid}.json")["Body"].read())
        c.head_object(Bucket="durability", Key=m["object"].split("/", 3)[3])
    capsys.readouterr()
    assert run_cli("--input", src, "--output", out, INMEM, *beam_s3_args(moto_endpoint)) == 0
    assert f"{len(committed)} skipped" in capsys.readouterr().out
    assert_same_examples(read_output(c, "durability", "sigterm", tmp_path), ref)


def test_sigterm_kills_the_pipeline_when_the_grace_period_runs_out(moto_endpoint, s3_thirty):
    src, _ = s3_thirty
    log = []
    proc = start(src, "s3://durability/grace0", moto_endpoint, "--shutdown-grace", "0", mode=INMEM)
    wait_for_line(proc, done_at_least(1), log)
    procs = family(proc)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_INTERRUPTED, rest[-3000:]
    assert "grace period over: killing the pipeline" in rest
    assert "stopped by SIGTERM (pipeline killed after the grace period)" in rest
    psutil.wait_procs(procs, timeout=15)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    meta = json.loads(boto_client(moto_endpoint).get_object(
        Bucket="durability", Key="grace0/preprocessing_metadata.json")["Body"].read())
    assert meta["status"] == "incomplete" and meta["cases"]["not_done"]
