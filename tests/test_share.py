"""--share I/N: several processes split one job through the output alone."""
import os
import subprocess
import sys

from conftest import INMEM, run_cli
from s3util import beam_s3_args, boto_client, s3_env, sample_on_s3

CLI = os.path.join(os.path.dirname(sys.executable), "master-poc-preprocess")
N = 4


def split_files(client, bucket, prefix):
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix) + 1:]
            if rel.endswith(".tfrecord.gz") and not rel.startswith("cases/"):
                out[rel] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_three_shares_give_the_bytes_of_one_process(moto_endpoint, tmp_path):
    src = sample_on_s3(moto_endpoint, str(tmp_path / "in"), "shares", N, 1200)
    s3 = beam_s3_args(moto_endpoint)
    assert run_cli("--input", src, "--output", "s3://shares/one", "--num-shards", "2", INMEM, *s3) == 0
    procs = [subprocess.Popen([CLI, "--input", src, "--output", "s3://shares/three", "--num-shards", "2",
                               "--share", f"{i}/3", "--poll-s", "0.2", "--leader-wait-s", "600", INMEM, *s3],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, **s3_env()))
             for i in (1, 2, 3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    assert "stage 1: 2 cases (share 1/3 of 4 cases)" in outs[0] and "complete" in outs[0]
    for out in outs[1:]:
        assert "1 of 1 cases committed" in out and "share 1 finalizes" in out
    c = boto_client(moto_endpoint)
    one, three = split_files(c, "shares", "one"), split_files(c, "shares", "three")
    assert sorted(one) == sorted(three) and len(one) >= 1
    assert one == three  # byte for byte
