"""A price before the run (master-poc-launch --estimate-from), and the
pipeline on Beam's portable runner as clusters run it (a job service and an
external worker pool, separate processes)."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
from conftest import EMPTY, GOOD, INMEM, run_cli, split_bytes
from s3util import free_port

from launch import estimate as est
from launch import launcher
from pipeline.io.vital import StepSeconds
from pipeline.output import storage
from pipeline.output.contracts import DoneMarker, Status


def synthetic_pilot(out: str) -> None:
    """10 cases, 2 worker processes, each committing a case every 4.0 s;
    finalize: shard writing 0.5 s + verification 1.5 s + metadata 3 s."""
    storage.write_json(storage.settings_path(out), {})
    for i in range(10):
        worker = 100 + i % 2
        storage.write_done(out, DoneMarker(case_id=i + 1, split="train", windows=300, object_bytes=600_000,
                                           host="pilot", worker=worker, committed=1000.0 + 4.0 * (i // 2),
                                           timings=StepSeconds(2.0, 1.9, 0.5)))
    storage.write_json(storage.metadata_path(out), {"status": Status.COMPLETE, "timings": {
        "stage2_shard_write_s": 0.5, "verify_s": 1.5, "metadata_report_s": 3.0}})


def test_the_estimate_from_a_pilot_whose_timings_are_known(tmp_path, capsys):
    out = str(tmp_path / "pilot")
    synthetic_pilot(out)
    p = est.read_pilot(out)
    assert (p.cases, p.seconds_per_case, p.finalize_per_case, p.finalize_fixed_s) == (10, 4.0, 0.2, 3.0)
    assert (p.windows_per_case, p.mb_per_case) == (300, 0.6)
    table = est.price_table()
    e = est.estimate(p, 3000, 6, "ml.m5.2xlarge", startup_s=180)
    speed = 8 * 0.975 ** 3  # 8 workers: three doublings at 0.975
    assert e.vcpus == 8 and math.isclose(est.speedup(8), speed) and math.isclose(est.speedup(2), 1.95)
    assert math.isclose(e.stage1_s, 500 * 4.0 / speed)
    assert math.isclose(e.finalize_s, 3.0 + 0.2 * 3000)
    wall = 180 + 500 * 4.0 / speed + 603.0
    assert math.isclose(e.wall_s, wall)
    price = table["types"]["ml.m5.2xlarge"]["on_demand"]
    assert math.isclose(e.on_demand, 6 * wall / 3600 * price) and \
        math.isclose(e.spot, e.on_demand * table["spot_factor"])
    assert math.isclose(est.estimate(p, 3000, 6, "ml.m5.2xlarge", price_per_hour=1.0).on_demand, 6 * wall / 3600)
    # the fewest hosts within 30 minutes: one host takes 180 + 3000 * 4 / 7.41 + 603 s = 40 min, two 27 min
    best = est.suggest_hosts(p, 3000, "ml.m5.2xlarge", 30 * 60)
    assert best.hosts == 2 and best.wall_s <= 30 * 60 < est.estimate(p, 3000, 1, "ml.m5.2xlarge").wall_s
    # through the launcher's command line: nothing is launched, no AWS call
    assert launcher.main(["--estimate-from", out, "--cases", "1-3000", "--instance-type", "ml.m5.2xlarge",
                          "--instance-count", "6", "--use-spot", "--target-hours", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "3000 cases on 6 x ml.m5.2xlarge (8 vCPUs" in text and f"${e.spot:,.2f}" in text
    assert f"{best.hosts} x ml.m5.2xlarge" in text and "us-east-1" in text
    assert launcher.main(["--estimate-from", out, "--cases", "1-10", "--instance-type", "ml.p9.huge"]) == 2
    assert "not in the price table" in capsys.readouterr().err
    assert launcher.main(["--estimate-from", str(tmp_path / "none"), "--cases", "1-10"]) == 2
    assert "not a finished output" in capsys.readouterr().err


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until the server accepts connections (it has started), or fail."""
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)  # polling a starting server
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture(scope="module")
def cluster():
    """Beam's job service and an external worker pool, each its own process
    (as Flink, Spark and Dataflow hand work to SDK workers); the pool starts
    `python` workers: this environment's."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    job_port, pool_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                               "--port", str(job_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                               "--service_port", str(pool_port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        wait_for_port(job_port, procs[0])
        wait_for_port(pool_port, procs[1])
        yield ["--runner", "PortableRunner", "--job_endpoint", f"localhost:{job_port}",
               "--environment_type", "EXTERNAL", "--environment_config", f"localhost:{pool_port}"]
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)


def test_the_portable_runner_with_external_workers_gives_the_same_files(cluster, dataset, tmp_path):
    """The DoFns pickled into other processes: tagged outputs (a failed case)
    and both sinks (case objects and markers, split files) work, and the
    split files equal the default runner's byte for byte."""
    cases = ",".join(map(str, GOOD[:4] + [EMPTY]))
    ref, out = str(tmp_path / "ref"), str(tmp_path / "portable")
    assert run_cli("--input", dataset, "--output", ref, "--cases", cases, "--min-success-rate", "0", INMEM) == 0
    assert run_cli("--input", dataset, "--output", out, "--cases", cases, "--min-success-rate", "0", *cluster) == 0
    assert split_bytes(out) == split_bytes(ref) != {}
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["status"] == "complete" and [f["case_id"] for f in meta["cases"]["failed"]] == [EMPTY]
    # the markers were written by the pool's worker processes, not this one
    workers = {storage.read_json(storage.marker_path(out, storage.DONE, c))["worker"] for c in GOOD[:4]}
    assert os.getpid() not in workers
