"""One configuration file for a job, a dataset that can be rebuilt, where it
came from, and what a rerun does when an input changed."""
import hashlib
import json
import os
import shutil

import google_crc32c
import pytest
from conftest import INMEM, run_cli, split_bytes

from pipeline.cli import parse_request
from pipeline.output import storage
from transforms.settings import OptionError


def test_config_file_runs_a_job_flags_win_and_unknown_keys_are_named(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("window: 600\nsplit: [80, 10, 10]\nemit_mask: true\ntracks: intellivue\ncases: 1-5\n"
                   "output: out-a\nnum_shards: 3\nbeam_args: --direct_running_mode=in_memory\n"
                   "sagemaker: {instance_count: 6}\nhyperparameters: {horizon: 5}\n")
    req = parse_request(["--config", str(cfg), "--window", "900", "--runner", "DirectRunner"])
    assert (req.settings.window, req.settings.split, req.settings.emit_mask, req.settings.horizon) == \
        (900, (80, 10, 10), True, 5)
    assert req.settings.tracks.name.startswith("Philips IntelliVue")
    assert (req.options.cases, req.options.output, req.options.num_shards) == ("1-5", "out-a", 3)
    assert list(req.beam_args) == ["--direct_running_mode=in_memory", "--runner", "DirectRunner"]
    cfg.write_text("windw: 600\n")
    with pytest.raises(OptionError, match=r"--config .*run.yaml: unknown option\(s\) windw"):
        parse_request(["--config", str(cfg)])
    cfg.write_text("window: 0\n")
    with pytest.raises(OptionError, match=r"run.yaml: window 0: must be a positive integer"):
        parse_request(["--config", str(cfg)])


def test_the_metadatas_configuration_rebuilds_the_same_dataset(dataset, tmp_path):
    first = str(tmp_path / "first")
    assert run_cli("--input", dataset, "--output", first, "--cases", "1-4,6", "--horizon", "3", "--emit-delta",
                   "--split-seed", "7", "--num-shards", "2", "--tracks", "intellivue", INMEM) == 0
    meta = json.load(open(f"{first}/preprocessing_metadata.json"))
    assert meta["config"]["cases"] == "1-4,6" and meta["config"]["horizon"] == 3
    assert meta["config"]["tracks"]["name"].startswith("Philips")  # the map itself, not a path
    again = str(tmp_path / "again")
    cfg = tmp_path / "meta-config.json"
    cfg.write_text(json.dumps(meta["config"]))
    assert run_cli("--config", str(cfg), "--output", again, INMEM) == 0
    a, b = split_bytes(first), split_bytes(again)
    assert len(a) >= 2 and a == b  # byte for byte
    # The config.yaml written beside the metadata does the same.
    third = str(tmp_path / "third")
    assert run_cli("--config", f"{first}/config.yaml", "--output", third, INMEM) == 0
    assert split_bytes(third) == a


def test_provenance_names_the_code_and_every_input(dataset, tmp_path):
    out = str(tmp_path / "o")
    assert run_cli("--input", dataset, "--output", out, "--cases", "1,2", INMEM) == 0
    p = json.load(open(f"{out}/preprocessing_metadata.json"))["provenance"]
    for cid in (1, 2):
        path = f"{dataset}/{cid:04d}.vital"
        got = p["inputs"][str(cid)]
        assert got["crc32c"] == f"{google_crc32c.value(open(path, 'rb').read()):08x}"
        assert got["bytes"] == os.path.getsize(path) and got["mtime"] == os.stat(path).st_mtime
    clinical = f"{dataset}/clinical_data.csv"
    assert p["clinical"] == [{"path": clinical, "bytes": os.path.getsize(clinical), "cases": 2,
                              "sha256": hashlib.sha256(open(clinical, "rb").read()).hexdigest(),
                              "format": {"separator": "comma", "decimal": "point", "encoding": "utf-8"},
                              "split_key": "subjectid"}]
    assert p["package"]["name"] == "master-poc-preprocessing" and p["package"]["version"]
    assert p["package"]["commit"]  # this checkout's, or the image's build argument
    assert set(p["versions"]) >= {"vitaldb", "apache-beam", "tfx-bsl", "python"}
    page = open(f"{out}/report/index.html").read()
    assert p["clinical"][0]["sha256"] in page and p["package"]["commit"] in page


def test_a_changed_input_is_processed_again_and_listed(dataset, tmp_path, capsys):
    src = tmp_path / "in"
    shutil.copytree(dataset, src)
    out = str(tmp_path / "o")
    assert run_cli("--input", str(src), "--output", out, "--cases", "1-3", INMEM) == 0
    before = {c: storage.read_json(storage.marker_path(out, storage.DONE, c)) for c in (1, 2, 3)}
    os.utime(src / "0001.vital", ns=(1, 10 ** 18))  # touched: another mtime, the same bytes
    shutil.copy(f"{dataset}/0004.vital", src / "0002.vital")  # replaced: other content
    capsys.readouterr()
    assert run_cli("--input", str(src), "--output", out, "--cases", "1-3", INMEM) == 0
    text = capsys.readouterr().out
    assert "1 skipped (already committed)" in text
    assert "2 committed case(s) processed again because their input file changed" in text
    after = {c: storage.read_json(storage.marker_path(out, storage.DONE, c)) for c in (1, 2, 3)}
    assert after[3] == before[3]
    assert after[1]["changed_input"] is None  # same bytes: recomputed, not a change
    assert after[2]["changed_input"]["crc32c"] == before[2]["input"]["crc32c"] != after[2]["input"]["crc32c"]
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["cases"]["changed_inputs"] == [2]
    assert meta["provenance"]["inputs"]["2"]["crc32c"] == \
        f"{google_crc32c.value(open(src / '0002.vital', 'rb').read()):08x}"
    # Its windows are the new file's.
    assert after[2]["windows"] == json.load(open(f"{out}/cases/_done/2.json"))["windows"]
    assert run_cli("--input", str(src), "--output", out, "--cases", "1-3", INMEM) == 0
    assert "3 skipped (already committed)" in capsys.readouterr().out


def test_the_launcher_reads_the_same_file(tmp_path, monkeypatch):
    from launch import launcher
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: s3://b/vital\noutput: s3://b/out\ncases: 1-3000\nemit_delta: true\ntracks: intellivue\n"
                   "sagemaker:\n  instance_count: 6\n  image_uri: img\n  role: arn:aws:iam::1:role/r\n"
                   "  region: eu-north-1\n")
    v = launcher.resolve(launcher.build_parser().parse_args(["--config", str(cfg)]))
    assert v.launch.instance_count == 6
    assert v.hyperparameters == {"input": "s3://b/vital", "output": "s3://b/out", "cases": "1-3000",
                                    "emit_delta": "true", "tracks": "intellivue"}
    req = parse_request(["--config", str(cfg)])  # the main command reads it too
    assert req.options.cases == "1-3000" and req.settings.emit_delta
    mapfile = tmp_path / "site.json"
    mapfile.write_text(json.dumps({"features": {"HR": {"sources": [{"track": "Site/HR", "unit": "/min"}]}}}))
    v = launcher.resolve(launcher.build_parser().parse_args(["--config", str(cfg), "--tracks", str(mapfile)]))
    sent = json.loads(v.hyperparameters["tracks"])  # a local file travels as its content
    assert sent["features"]["HR"]["sources"][0]["track"] == "Site/HR"
    from launch.entrypoint import request_for_host
    req = request_for_host({**v.hyperparameters, "tracks": sent}, "algo-1", ["algo-1"])
    assert [s.track for s in req.settings.feature_spec().feature("HR").sources] == ["Solar8000/HR", "Site/HR"]
