"""S3 end to end against moto's server over HTTP: input, clinical table and
output on s3://, transient faults injected by a proxy, bad buckets/endpoints."""
import json
import os

import pytest
from conftest import (
    ALL_CASES,
    EXPECTED_FAILURES,
    GOOD,
    INMEM,
    assert_same_examples,
    examples_by_key,
    read_examples,
    run_cli,
)
from s3util import FaultProxy, beam_s3_args, boto_client, download_prefix, upload_dir

from pipeline.io.documents import load_track_map
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
    from pipeline.output import storage
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

    from pipeline.io import s3
    from pipeline.output import storage
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

    from pipeline.io import s3
    from pipeline.output import storage
    from pipeline.output.contracts import Member, PlannedCase, ShardPlan
    from pipeline.stages import stage2
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


@pytest.fixture
def s3_known_only_by_flags(monkeypatch):
    """No S3 endpoint, credentials or region in the environment (moto_endpoint
    puts credentials there; an earlier run may have exported its S3 options),
    no AWS config files, Beam's FileSystems without S3 options: the emulator
    is reachable only through the Beam flags. All restored after."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    env, options = dict(os.environ), FileSystems._pipeline_options
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    os.environ.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                      AWS_EC2_METADATA_DISABLED="true")
    FileSystems.set_options(PipelineOptions([]))
    yield
    os.environ.clear()
    os.environ.update(env)
    FileSystems._pipeline_options = options


def _put_config_and_map(c, bucket: str, config: bytes = b"split_seed: 7\nhorizon: 5\n"):
    from transforms import trackmap
    local = os.path.join(trackmap.SHIPPED_DIR, "intellivue.yaml")
    c.put_object(Bucket=bucket, Key="cfg.yaml", Body=config)
    with open(local, "rb") as fh:
        c.put_object(Bucket=bucket, Key="map.yaml", Body=fh.read())
    return load_track_map(local)


def test_config_and_track_map_on_s3_are_read_with_the_beam_s3_flags(moto_endpoint, s3_bucket,
                                                                    s3_known_only_by_flags):
    from pipeline.cli import parse_request
    expected = _put_config_and_map(boto_client(moto_endpoint), s3_bucket)
    assert not [k for k in os.environ if k.startswith("AWS_ENDPOINT")]
    req = parse_request(["--config", f"s3://{s3_bucket}/cfg.yaml", "--tracks", f"s3://{s3_bucket}/map.yaml",
                         "--output", f"s3://{s3_bucket}/out"] + beam_s3_args(moto_endpoint))
    assert (req.settings.split_seed, req.settings.horizon) == (7, 5)
    assert req.settings.tracks == expected and req.settings.tracks.name == expected.name
    assert req.settings.tracks.as_json() == expected.as_json()
    assert list(req.beam_args) == beam_s3_args(moto_endpoint)


def test_a_config_files_beam_args_apply_to_its_track_map_on_s3(moto_endpoint, s3_bucket, s3_known_only_by_flags,
                                                                tmp_path):
    from pipeline.cli import parse_request
    expected = _put_config_and_map(boto_client(moto_endpoint), s3_bucket)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"tracks: s3://{s3_bucket}/map.yaml\nsplit_seed: 9\n"
                   f"beam_args: {' '.join(beam_s3_args(moto_endpoint))}\n")
    req = parse_request(["--config", str(cfg)])
    assert req.settings.split_seed == 9 and req.settings.tracks == expected
    assert list(req.beam_args) == beam_s3_args(moto_endpoint)


def test_a_missing_config_or_track_map_on_s3_is_named(moto_endpoint, s3_bucket, s3_known_only_by_flags):
    from pipeline.cli import parse_request
    from transforms.settings import OptionError
    _put_config_and_map(boto_client(moto_endpoint), s3_bucket)
    path = f"s3://{s3_bucket}/missing.yaml"
    with pytest.raises(OptionError) as err:
        parse_request(["--config", path] + beam_s3_args(moto_endpoint))
    # the emulator's answer (the object is not there), not a connection or credentials error
    assert str(err.value) == f"--config {path}: cannot read it ([Errno 2] Not found: {path})"
    with pytest.raises(OptionError) as err:
        parse_request(["--config", f"s3://{s3_bucket}/cfg.yaml", "--tracks", path] + beam_s3_args(moto_endpoint))
    assert f"track map {path}: cannot read it ([Errno 2] Not found: {path})" in str(err.value), str(err.value)


def test_the_sagemaker_entry_point_reads_an_s3_track_map_with_its_beam_s3_flags(moto_endpoint, s3_bucket,
                                                                               s3_known_only_by_flags):
    from launch import entrypoint
    expected = _put_config_and_map(boto_client(moto_endpoint), s3_bucket)
    hp = {"cases": "1-3", "input": f"s3://{s3_bucket}/in", "output": f"s3://{s3_bucket}/out",
          "tracks": f"s3://{s3_bucket}/map.yaml", "beam_args": " ".join(beam_s3_args(moto_endpoint))}
    req = entrypoint.request_for_host(hp, "algo-1", ["algo-1"])
    assert req.settings.tracks == expected


def test_the_stage_process_inherits_the_runs_io_options_and_not_its_s3_clients(io_settings_restored, monkeypatch,
                                                                                tmp_path):
    """The forked stage process applies no I/O options of its own
    (pipeline.run.runtime.setup_io): it runs with the ones its run applied
    (retries, S3 options in the environment and Beam's FileSystems) and
    builds its own S3 clients."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import S3Options

    from pipeline.io import s3
    from pipeline.output.contracts import Stage2Job
    from pipeline.run import runtime
    from pipeline.run.supervisor import Supervisor
    flags = ["--s3_endpoint_url=http://127.0.0.1:9", "--s3_region_name=eu-west-3"]
    runtime.setup_io(flags, 4, "adaptive")
    monkeypatch.setitem(s3._SharedSession._clients, "the parent's", object())
    seen = tmp_path / "seen.json"

    def stage(job):
        s3o = FileSystems._pipeline_options.view_as(S3Options)
        seen.write_text(json.dumps([os.environ.get(k) for k in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
                                                                 "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")]
                                   + [s3o.s3_endpoint_url, s3o.s3_region_name, len(s3._SharedSession._clients)]))
        return {"ran": 1}

    monkeypatch.setattr(runtime, "run_stage", stage)
    monkeypatch.setattr(runtime, "setup_io", lambda *a, **k: pytest.fail("the stage process applied I/O options"))
    with Supervisor(5) as sup:
        assert sup.run_job(Stage2Job(output=str(tmp_path), beam_args=flags)) == (0, {"ran": 1})
    assert json.loads(seen.read_text()) == ["4", "adaptive", "http://127.0.0.1:9", "eu-west-3",
                                            "http://127.0.0.1:9", "eu-west-3", 0]
