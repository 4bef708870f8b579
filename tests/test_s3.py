"""S3 end to end against moto's server over HTTP: input, clinical table and
output on s3://, transient faults injected by a proxy, bad buckets/endpoints."""
import json


from conftest import ALL_CASES, EXPECTED_FAILURES, GOOD, INMEM, assert_same_examples, examples_by_key, read_examples, run_cli
from s3util import FaultProxy, beam_s3_args, boto_client, download_prefix, upload_dir
from transforms import spec

CASES = ",".join(map(str, ALL_CASES))


def s3_examples(client, bucket, prefix, tmp_path):
    out = {}
    for s in spec.SPLIT_NAMES:
        d = tmp_path / f"dl-{s}"
        d.mkdir()
        out.update(examples_by_key(read_examples(download_prefix(client, bucket, f"{prefix}/{s}/", str(d),
                                                                 ".tfrecord.gz"))))
    return out


def local_examples(out):
    from pipeline import storage
    files = [f for s in spec.SPLIT_NAMES for f in storage.list_files(f"{out}/{s}/*.tfrecord.gz")]
    return examples_by_key(read_examples(files))


def test_s3_input_clinical_and_output_match_a_local_run(moto_endpoint, s3_bucket, dataset, run_output, tmp_path):
    c = boto_client(moto_endpoint)
    src = upload_dir(c, dataset, s3_bucket, "raw")
    out = f"s3://{s3_bucket}/processed"
    rc = run_cli(*["--input", src, "--clinical", f"{src}/clinical_data.csv", "--output", out, "--cases", CASES,
               "--min-success-rate", "0", INMEM] + beam_s3_args(moto_endpoint))
    assert rc == 0
    meta = json.loads(c.get_object(Bucket=s3_bucket, Key="processed/preprocessing_metadata.json")["Body"].read())
    assert meta["status"] == "complete" and meta["verification"]["ok"]
    assert {f["case_id"]: f["reason"] for f in meta["cases"]["failed"]} == EXPECTED_FAILURES
    assert_same_examples(s3_examples(c, s3_bucket, "processed", tmp_path), local_examples(run_output[1]))
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=s3_bucket, Prefix="processed/")["Contents"]]
    assert "processed/schema.pbtxt" in keys
    assert not [k for k in keys if "/_tmp/" in k]
    # verify works on s3:// too
    assert run_cli(*["verify", "--output", out] + beam_s3_args(moto_endpoint)) == 0


def test_transient_s3_faults_are_absorbed(moto_endpoint, s3_bucket, dataset, run_output, tmp_path, capsys):
    c = boto_client(moto_endpoint)
    src = upload_dir(c, dataset, s3_bucket, "raw")
    port = int(moto_endpoint.rsplit(":", 1)[1])
    cases = GOOD[:3]
    with FaultProxy(port, rate=0.15, seed=11) as proxy:
        rc = run_cli(*["--input", src, "--output", f"s3://{s3_bucket}/out", "--cases", ",".join(map(str, cases)),
                       INMEM] + beam_s3_args(proxy.endpoint))
    print(f"fault proxy: {proxy.counts}")
    assert rc == 0
    assert proxy.faults >= 10, proxy.counts  # the run really went through faults
    ref = local_examples(run_output[1])
    assert_same_examples(s3_examples(c, s3_bucket, "out", tmp_path), {k: v for k, v in ref.items() if k[0] in cases})


def test_missing_bucket_and_unreachable_endpoint_fail_fast(moto_endpoint, s3_bucket, tmp_path, capsys):
    rc = run_cli(*["--input", f"s3://{s3_bucket}/raw", "--output", "s3://no-such-bucket-here/out", "--cases", "1",
               INMEM] + beam_s3_args(moto_endpoint))
    assert rc == 2
    assert "S3 bucket 'no-such-bucket-here' does not exist" in capsys.readouterr().err
    from s3util import free_port
    dead = f"http://127.0.0.1:{free_port()}"
    rc = run_cli(*["--input", f"s3://{s3_bucket}/raw", "--output", f"s3://{s3_bucket}/out", "--cases", "1", INMEM]
              + beam_s3_args(dead))
    assert rc == 2
    assert "cannot reach the S3 endpoint" in capsys.readouterr().err


def test_empty_s3_input_is_refused(moto_endpoint, s3_bucket, capsys):
    rc = run_cli(*["--input", f"s3://{s3_bucket}/nothing", "--output", f"s3://{s3_bucket}/out", INMEM]
              + beam_s3_args(moto_endpoint))
    assert rc == 2
    assert "holds no <id>.vital files" in capsys.readouterr().err


def test_beam_s3_calls_reuse_one_boto3_client(moto_endpoint, s3_bucket):
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import s3, storage
    s3.share_boto3_clients()
    FileSystems.set_options(PipelineOptions(beam_s3_args(moto_endpoint)))
    storage.write_atomic(f"s3://{s3_bucket}/a.json", b"{}")
    before = s3._SharedSession.created
    for i in range(5):
        assert FileSystems.exists(f"s3://{s3_bucket}/a.json")
        assert not FileSystems.exists(f"s3://{s3_bucket}/missing-{i}.json")
    storage.write_atomic(f"s3://{s3_bucket}/big.bin", b"x" * (storage.SINGLE_PART_MAX + 10))
    assert storage.read_bytes(f"s3://{s3_bucket}/big.bin") == b"x" * (storage.SINGLE_PART_MAX + 10)
    assert s3._SharedSession.created == before  # no new client per call
    keys = [o["Key"] for o in boto_client(moto_endpoint).list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == ["a.json", "big.bin"]  # the temporary object of the big write is gone


def test_s3_connections_stay_pooled_when_finalize_reads_markers_and_shards(moto_endpoint, s3_bucket, caplog):
    """Finalize reads markers with 16 threads and a shard reads many case
    objects through one shared client: botocore's default pool of 10 made
    urllib3 log 'Connection pool is full, discarding connection' dozens of
    times on a 3000-case output."""
    import io
    import logging

    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import s3, stage2, storage
    from pipeline.contracts import Member, PlannedCase, ShardPlan
    from transforms import encode, tfrecord
    s3.share_boto3_clients()
    FileSystems.set_options(PipelineOptions(beam_s3_args(moto_endpoint)))
    out = f"s3://{s3_bucket}/o"
    cases = []
    for cid in range(1, 61):
        recs = [f"case {cid} window {w}".encode() for w in range(4)]
        data, members = encode.gzip_members(recs, 2)
        path = storage.case_object(out, "train", cid)
        storage.write_atomic(path, data)
        storage.write_json(storage.marker_path(out, storage.DONE, cid), {"case_id": cid})
        cases.append(PlannedCase(cid, 4, path, tuple(Member(*m) for m in members)))
    plan = ShardPlan("train", 0, 1, tuple(cases))
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        for _ in range(3):
            assert sorted(storage.read_done(out)) == list(range(1, 61))
        res = stage2.write_shard(out, plan, 42)
    assert not [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
    assert res.records == 240
    got = sorted(tfrecord.iter_records(io.BytesIO(storage.read_bytes(res.path))))
    assert got == sorted(f"case {c} window {w}".encode() for c in range(1, 61) for w in range(4))
