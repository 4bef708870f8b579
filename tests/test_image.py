"""The SageMaker image, built from the Dockerfile and run as SageMaker runs it.

Run on its own (a few minutes: a Debian base, then TensorFlow, Beam and
tfx-bsl are installed into the image): `./test.sh -m image` (the default
`./test.sh` leaves it out; `.ci/run` runs both). Built with
scripts/build-image.sh on buildah (no Docker daemon here) from a stand-in
for python:3.11-slim-bookworm made with debootstrap (scripts/standin-base.sh),
then started twice, as algo-1 and algo-2, with SageMaker's argument `train`
and its config files mounted at /opt/ml, against the S3 emulator on loopback.
"""
import json
import os
import shutil
import subprocess
import time

import pytest
from conftest import copy_repo
from s3util import KEY, REGION, SECRET, boto_client, sample_on_s3

pytestmark = pytest.mark.image
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "localhost/master-poc-base:bookworm"
IMAGE = "localhost/master-poc-preprocess:test"
TOOLS = ("buildah", "podman", "debootstrap")


def _have_tools() -> bool:
    return all(shutil.which(t) for t in TOOLS)


def buildah_or_skip() -> None:
    if _have_tools():
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *TOOLS], capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not _have_tools():
        pytest.skip("the image is not built here: buildah, podman and debootstrap cannot be installed "
                    "(needs root and Debian's packages)")


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def image():
    buildah_or_skip()
    t = time.time()
    base = sh(os.path.join(ROOT, "scripts", "standin-base.sh"), BASE)
    assert base.returncode == 0, base.stderr[-3000:]
    print(f"stand-in base image {BASE}: {time.time() - t:.0f} s")
    t = time.time()
    build = sh(os.path.join(ROOT, "scripts", "build-image.sh"), "--base", BASE, "--tag", IMAGE)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size = sh("buildah", "images", "--format", "{{.Size}}", IMAGE).stdout.strip()
    print(f"image {IMAGE}: built in {time.time() - t:.0f} s, {size}")
    return IMAGE


def test_a_code_change_rebuilds_only_the_package_layer(image, tmp_path):
    ctx = tmp_path / "ctx"
    copy_repo(ctx)
    with open(ctx / "pipeline" / "cli.py", "a") as fh:
        fh.write("# a one-line change\n")
    t = time.time()
    res = sh("buildah", "bud", "--layers", "--isolation", "chroot", "--network", "host", "--build-arg",
             f"BASE_IMAGE={BASE}", "-t", IMAGE + "-changed", str(ctx))
    print(f"rebuild after a one-line change: {time.time() - t:.0f} s")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = res.stdout.split("STEP ")
    deps = next(s for s in steps if "pip install -c constraints.txt -r requirements.txt" in s)
    package = next(s for s in steps if "pip install --no-deps" in s)
    assert "Using cache" in deps  # TensorFlow and Beam are not installed again
    assert "Using cache" not in package  # the changed code is
    sh("buildah", "rmi", IMAGE + "-changed")


def test_two_containers_run_the_job_as_sagemaker_does(image, moto_endpoint, tmp_path):
    inspect = json.loads(sh("buildah", "inspect", "--type", "image", image).stdout)
    entrypoint = inspect["OCIv1"]["config"]["Entrypoint"]
    assert entrypoint == ["master-poc-sagemaker"]
    src = sample_on_s3(moto_endpoint, str(tmp_path / "vital"), "image-run", 8, 1200)
    hosts = ["algo-1", "algo-2"]
    hp = {"cases": "1-8", "input": src, "output": "s3://image-run/out", "poll_s": "1", "leader_wait_s": "600"}
    containers, procs = [], {}
    try:
        for host in hosts:
            root = tmp_path / host
            (root / "input" / "config").mkdir(parents=True)
            (root / "input/config/hyperparameters.json").write_text(json.dumps(hp))
            (root / "input/config/resourceconfig.json").write_text(
                json.dumps({"current_host": host, "hosts": hosts, "network_interface_name": "eth0"}))
            name = sh("buildah", "from", "--name", f"mpp-{host}-{os.getpid()}", image).stdout.strip()
            containers.append(name)
            env = [f"AWS_ACCESS_KEY_ID={KEY}", f"AWS_SECRET_ACCESS_KEY={SECRET}", f"AWS_DEFAULT_REGION={REGION}",
                   f"AWS_ENDPOINT_URL_S3={moto_endpoint}"]
            cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host", "-v", f"{root}:/opt/ml"]
            for e in env:
                cmd += ["-e", e]
            procs[host] = subprocess.Popen(cmd + [name, "--", *entrypoint, "train"], stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
        outs = {h: p.communicate(timeout=900)[0] for h, p in procs.items()}
        for h, p in procs.items():
            assert p.returncode == 0, f"{h}:\n{outs[h][-3000:]}"
        assert "host algo-2 (2 of 2): 4 of 8 cases" in outs["algo-2"]
        c = boto_client(moto_endpoint)
        meta = json.loads(c.get_object(Bucket="image-run", Key="out/preprocessing_metadata.json")["Body"].read())
        assert meta["status"] == "complete" and meta["verification"]["ok"]
        assert meta["cases"]["requested"] == 8 and len(meta["cases"]["ok"]) == 8
        assert meta["versions"]["python"].startswith("3.11")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for name in containers:
            sh("buildah", "rm", name)
