"""End to end: the real CLI on generated cases, outputs read back with TensorFlow."""
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import (
    ALL_CASES,
    DUPLICATE_ROW,
    EMPTY,
    EXPECTED_FAILURES,
    GOOD,
    IMPLAUSIBLE,
    IMPLAUSIBLE_ROW,
    INMEM,
    NO_ROW,
    NO_TRACKS,
    NOT_VITAL,
    REPO,
    SHORT,
    copy_repo,
    examples_by_key,
    expected_split,
    read_examples,
    run_cli,
)

from pipeline.io import clinical
from pipeline.io import vital as load
from pipeline.io.sources import Source
from pipeline.output import storage
from pipeline.tools.sample import sample_split
from transforms import features, spec
from transforms.per_case import process_case
from transforms.settings import Settings


def split_files(out, split):
    return storage.list_files(f"{out}/{split}/*.tfrecord.gz")


def all_examples(out):
    return {s: read_examples(split_files(out, s)) for s in spec.SPLIT_NAMES}


def test_run_writes_correct_splits_metadata_and_schema(run_output, dataset):
    rc, out = run_output
    assert rc == 0
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["status"] == "complete" and meta["verification"]["ok"]
    exs = all_examples(out)
    seen = {}
    for s, items in exs.items():
        assert len(items) == meta["splits"][s]["windows"]
        for e in items:
            assert e["timeseries"].shape == (4800,) and e["static"].shape == (6,) and e["targets"].shape == (8,)
            for k in ("timeseries", "static", "targets"):
                assert np.all(np.abs(e[k]) <= 1.0)
            cid = int(e["case_id"][0])
            assert seen.setdefault(cid, s) == s, f"case {cid} in two splits"
            assert expected_split(cid, f"{dataset}/clinical_data.csv") == s
    assert sorted(seen) == sorted(GOOD + [NO_ROW, IMPLAUSIBLE])
    for cid in seen:
        assert sum(1 for e in exs[seen[cid]] if e["case_id"][0] == cid) == (1500 - 301) // 30 + 1
    failed = {f["case_id"]: f["reason"] for f in meta["cases"]["failed"]}
    assert failed == EXPECTED_FAILURES
    assert meta["cases"]["too_short"] == [SHORT]
    assert meta["cases"]["no_clinical_row"] == [NO_ROW]
    assert meta["cases"]["dose_weight_default"] == sorted([GOOD[1], NO_ROW, IMPLAUSIBLE])
    assert meta["cases"]["static_defaults"][str(GOOD[2])] == ["asa"]
    assert [f["name"] for f in meta["spec"]["timeseries"]] == list(spec.DEFAULT_SPEC.feature_names)
    assert meta["settings"]["window"] == 300 and meta["settings"]["split_seed"] == 42
    schema = open(f"{out}/schema.pbtxt").read()
    assert 'name: "timeseries"' in schema and "size: 4800" in schema


def test_examples_hold_the_case_values_in_order(run_output, dataset):
    """One example compared with the pure per-case computation: the right
    window, the right target second, the static row."""
    _, out = run_output
    cid = GOOD[0]
    split = sample_split(cid)
    ex = examples_by_key(read_examples(split_files(out, split)))
    rc = load.load_case(Source.for_location(dataset), cid)
    table = clinical.read_clinical(f"{dataset}/clinical_data.csv")
    cw = process_case(cid, rc.raw, table.row(cid), Settings(), split_key=table.split_key(cid))
    e = ex[(cid, 60)]
    np.testing.assert_allclose(e["timeseries"], cw.timeseries[2], atol=0)
    np.testing.assert_allclose(e["targets"], cw.targets[2], atol=0)
    np.testing.assert_allclose(e["static"], cw.static, atol=0)
    # De-normalised values are clinical: HR near the generator's 60-90/min.
    hr = features.denormalise_feature(e["timeseries"].reshape(300, 16)[:, 0], "HR")
    assert 40 < np.median(hr) < 110


def test_rerun_does_no_new_work_and_gives_the_same_examples(run_output, dataset, capsys):
    rc, out = run_output
    before = {s: examples_by_key(v) for s, v in all_examples(out).items()}
    done_mtimes = {p: os.path.getmtime(p) for p in storage.list_files(f"{out}/cases/_done/*.json")}
    rc2 = run_cli(*["--input", dataset, "--output", out, "--cases", ",".join(map(str, ALL_CASES)),
                "--min-success-rate", "0", INMEM])
    assert rc2 == 0
    # 8 good + NO_ROW + SHORT + IMPLAUSIBLE have done markers; the 7 failed cases are tried again.
    assert "11 skipped (already committed)" in capsys.readouterr().out
    assert {p: os.path.getmtime(p) for p in storage.list_files(f"{out}/cases/_done/*.json")} == done_mtimes
    after = {s: examples_by_key(v) for s, v in all_examples(out).items()}
    for s in spec.SPLIT_NAMES:
        assert after[s].keys() == before[s].keys()
        for k in before[s]:
            for f in ("timeseries", "targets", "static"):
                np.testing.assert_array_equal(after[s][k][f], before[s][k][f])


def test_min_success_rate_exit_code(dataset, tmp_path):
    cases = f"{GOOD[0]},{EMPTY}"
    assert run_cli(*["--input", dataset, "--output", str(tmp_path / "a"), "--cases", cases, INMEM]) == 1
    assert run_cli(*["--input", dataset, "--output", str(tmp_path / "b"), "--cases", cases,
                 "--min-success-rate", "0.5", INMEM]) == 0
    # What succeeded is written even when the rate is too low.
    assert os.path.exists(tmp_path / "a" / "preprocessing_metadata.json")


def test_bad_cases_string_is_refused_before_any_work(dataset, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(*["--input", dataset, "--output", str(out), "--cases", "1-5,x,9-3", INMEM]) == 2
    err = capsys.readouterr().err
    assert "'x'" in err and "'9-3'" in err
    assert not out.exists()


def test_unreadable_input_and_clinical_are_refused_at_start(dataset, tmp_path, capsys):
    assert run_cli(*["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), INMEM]) == 2
    assert "no <id>.vital files" in capsys.readouterr().err
    assert run_cli(*["--input", dataset, "--clinical", str(tmp_path / "none.csv"), "--output", str(tmp_path / "o"),
                 "--cases", "1", INMEM]) == 2
    assert "cannot read clinical table" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("id;age\n1;3\n")
    assert run_cli(*["--input", dataset, "--clinical", str(bad), "--output", str(tmp_path / "o"), "--cases", "1",
                 INMEM]) == 2
    assert "no 'caseid' column" in capsys.readouterr().err


def test_other_settings_into_the_same_output_are_refused(dataset, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run_cli(*["--input", dataset, "--output", out, "--cases", "1", INMEM]) == 0
    assert run_cli(*["--input", dataset, "--output", out, "--cases", "1", "--horizon", "5", INMEM]) == 2
    assert "other settings" in capsys.readouterr().err
    assert run_cli(*["--input", dataset, "--output", out, "--cases", "1", "--horizon", "5", "--overwrite", INMEM]) == 0
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["settings"]["horizon"] == 5


def test_finalize_is_idempotent_and_verify_detects_damage(dataset, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run_cli(*["--input", dataset, "--output", out, "--cases", "1-6", "--num-shards", "2", INMEM]) == 0
    files = sorted(storage.list_files(f"{out}/*/*.tfrecord.gz"))
    blobs = {f: open(f, "rb").read() for f in files}
    assert run_cli(*["finalize", "--output", out, "--num-shards", "2", INMEM]) == 0
    assert {f: open(f, "rb").read() for f in files} == blobs  # byte-identical
    # The same process ran the job and then finalize: the metadata holds only finalize's times.
    assert "stage1_s" not in json.load(open(f"{out}/preprocessing_metadata.json"))["timings"]
    assert run_cli(*["verify", "--output", out]) == 0
    victim = files[0]
    data = blobs[victim]
    open(victim, "wb").write(data[: len(data) // 2])
    capsys.readouterr()
    assert run_cli(*["verify", "--output", out]) == 1
    assert "VERIFY FAILED" in capsys.readouterr().out
    # finalize repairs it from the committed cases; another shard count replaces the old files.
    assert run_cli(*["finalize", "--output", out, "--num-shards", "1", INMEM]) == 0
    assert all(f.endswith("-00000-of-00001.tfrecord.gz") for f in storage.list_files(f"{out}/*/*.tfrecord.gz"))
    assert run_cli(*["verify", "--output", out]) == 0


def test_orphan_case_object_without_marker_is_never_counted(dataset, tmp_path):
    out = str(tmp_path / "o")
    assert run_cli(*["--input", dataset, "--output", out, "--cases", "1,2", INMEM]) == 0
    split = sample_split(3)
    orphan = storage.case_object(out, split, 3)
    storage.write_atomic(orphan, open(storage.case_object(out, sample_split(1), 1), "rb").read())
    assert run_cli(*["finalize", "--output", out, INMEM]) == 0
    ids = {int(e["case_id"][0]) for s in spec.SPLIT_NAMES for e in read_examples(split_files(out, s))}
    assert ids == {1, 2}


def test_emit_mask_round_trips(dataset, tmp_path):
    import tensorflow as tf
    out = str(tmp_path / "o")
    assert run_cli(*["--input", dataset, "--output", out, "--cases", "1", "--emit-mask", INMEM]) == 0
    feats = {"observed": tf.io.FixedLenFeature([4800], tf.float32),
             "timeseries": tf.io.FixedLenFeature([4800], tf.float32)}
    ex = read_examples(split_files(out, sample_split(1)), feats)
    obs = np.stack([e["observed"] for e in ex]).reshape(-1, 300, 16)
    assert set(np.unique(obs)) <= {0.0, 1.0}
    # HR is recorded every 2 s (with drop-outs): about half the seconds are measured.
    assert 0.3 < obs[:, :, 0].mean() < 0.55
    assert 'name: "observed"' in open(f"{out}/schema.pbtxt").read()


def repo_copy(tmp_path):
    """A copy of the repository sharing this checkout's .venv."""
    copy = tmp_path / "repo"
    copy_repo(copy)
    os.symlink(os.path.join(REPO, ".venv"), copy / ".venv")
    return copy


def test_the_readmes_first_command_runs_the_sample_job(tmp_path):
    """`./run.sh`, exactly as the README prints it: 20 generated cases in all
    three splits, real worker processes, the report; then inspect as printed."""
    repo = repo_copy(tmp_path)
    res = subprocess.run(["./run.sh"], cwd=repo, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout
    assert "no --input: generating 20 VitalDB-format sample cases" in text and "complete" in text
    assert "19 ok, 1 too short" in text and "progress: 20/20 cases done, 0 failed" in text
    assert "clinical entry error(s) treated as missing: weight=900.0" in text
    out = repo / "output"
    meta = json.load(open(out / "preprocessing_metadata.json"))
    assert all(meta["splits"][s]["cases"] > 0 for s in spec.SPLIT_NAMES)  # train, validation and test
    assert os.path.exists(out / "report" / "index.html") and os.path.exists(out / "config.yaml")
    markers = [json.load(open(p)) for p in storage.list_files(f"{out}/cases/_done/*.json")]
    assert sum(meta["splits"][s]["windows"] for s in spec.SPLIT_NAMES) == sum(m["windows"] for m in markers)
    # Each case's steps are timed where they ran (a worker process, not this
    # one) and summed into the metadata; stage 2 reports its shard writing.
    steps = ("load", "parse", "transform", "encode", "compress", "write")
    ok = [m for m in markers if m["status"] == "ok"]
    assert len(ok) == 19 and all(m["worker"] != os.getpid() and isinstance(m["worker"], int) for m in ok)
    for m in ok:
        t = m["timings"]
        assert set(t) == set(steps) and all(v >= 0 for v in t.values())
        assert 0 < t["parse"] <= t["load"] and t["compress"] > 0
    total = meta["timings"]["case_steps_s"]
    for k in steps:
        assert total[k] == pytest.approx(sum(m["timings"].get(k, 0) for m in markers), abs=0.01)
    assert 0 < meta["timings"]["stage2_shard_write_s"] <= meta["timings"]["stage2_s"]
    shown = subprocess.run([".venv/bin/master-poc-preprocess", "inspect", "output/", "--examples", "3"], cwd=repo,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.count("example: case") == 3 and "Propofol_INF" in shown.stdout


def test_other_monitors_files_fail_as_no_tracks_naming_their_tracks(dataset, tmp_path):
    from conftest import INTELLIVUE_TRACKS, write_foreign_monitor_file
    with pytest.raises(load.CaseError) as err:
        load.load_case(Source.for_location(dataset), NO_TRACKS)
    assert err.value.code == "no_tracks"
    detail = err.value.detail
    assert "has 14 track(s): " + ", ".join(INTELLIVUE_TRACKS[:12]) + " and 2 more" in detail
    # A few tracks: all named, no count.
    write_foreign_monitor_file(str(tmp_path / "0001.vital"), ["GE/HR", "GE/NIBP_SYS"])
    with pytest.raises(load.CaseError) as err:
        load.load_case(Source.for_location(str(tmp_path)), 1)
    assert err.value.code == "no_tracks" and err.value.detail.endswith("has 2 track(s): GE/HR, GE/NIBP_SYS")
    # corrupt_file only when it really is: a gzip file that is not a .vital file, a damaged stream.
    with pytest.raises(load.CaseError) as err:
        load.load_case(Source.for_location(dataset), NOT_VITAL)
    assert err.value.code == "corrupt_file" and "no VITA signature" in err.value.detail
    data = bytearray(open(f"{dataset}/{GOOD[0]:04d}.vital", "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(tmp_path / "0002.vital", "wb").write(bytes(data))
    with pytest.raises(load.CaseError) as err:
        load.load_case(Source.for_location(str(tmp_path)), 2)
    assert err.value.code == "corrupt_file"


def test_clinical_entry_errors_are_missing_listed_and_shown(run_output, capsys):
    _, out = run_output
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["cases"]["static_implausible"] == {str(IMPLAUSIBLE): {k: v for k, v in IMPLAUSIBLE_ROW.items()
                                                                    if k != "sex"}}
    assert meta["cases"]["static_defaults"][str(IMPLAUSIBLE)] == ["age", "height", "weight", "bmi", "asa"]
    assert IMPLAUSIBLE in meta["cases"]["dose_weight_default"]
    assert meta["settings"]["spec_version"] == "1.3"
    dup = next(f for f in meta["cases"]["failed"] if f["case_id"] == DUPLICATE_ROW)
    assert "weight" in dup["detail"] and "data rows" in dup["detail"]
    html = open(f"{out}/report/index.html").read()
    assert "weight=900.0" in html
    q = json.load(open(f"{out}/report/quality.json"))
    assert next(c for c in q["cases"] if c["case_id"] == IMPLAUSIBLE)["static_implausible"]["weight"] == 900.0


def test_output_of_an_older_contract_is_refused_without_overwrite(dataset, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(*["--input", dataset, "--output", str(out), "--cases", "1", INMEM]) == 0
    settings = json.load(open(out / "cases" / "_settings.json"))
    json.dump(dict(settings, spec_version="1.1"), open(out / "cases" / "_settings.json", "w"))
    assert run_cli(*["--input", dataset, "--output", str(out), "--cases", "1", INMEM]) == 2
    assert "spec_version" in capsys.readouterr().err
    assert run_cli(*["--input", dataset, "--output", str(out), "--cases", "1", "--overwrite", INMEM]) == 0


def test_damaged_files_are_named_and_a_rerun_heals_them(dataset, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run_cli(*["--input", dataset, "--output", out, "--cases", "1-4", INMEM]) == 0
    shard = storage.list_files(f"{out}/train/*.tfrecord.gz")[0]
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0x01  # one flipped bit in a split file
    open(shard, "wb").write(bytes(data))
    capsys.readouterr()
    assert run_cli(*["verify", "--output", out]) == 1
    text = capsys.readouterr().out
    assert f"VERIFY FAILED: {shard}: damaged, unreadable:" in text and "Traceback" not in text
    # A changed byte in a case object: finalize copies it, verification names the
    # split file and the case object, the case becomes failed; a rerun recomputes it.
    assert run_cli(*["finalize", "--output", out, INMEM]) == 0  # repaired from the case objects
    victim = storage.case_object(out, sample_split(2), 2)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(victim, "wb").write(bytes(data))
    capsys.readouterr()
    assert run_cli(*["finalize", "--output", out, INMEM]) == 1
    text = capsys.readouterr().out
    assert f"case 2: case object {victim} is damaged" in text
    assert storage.read_json(storage.marker_path(out, storage.FAILED, 2))["reason"] == "damaged_case_object"
    # A truncated case object is found before any shard is written.
    victim3 = storage.case_object(out, sample_split(3), 3)
    head = open(victim3, "rb").read()[:100]
    open(victim3, "wb").write(head)
    assert run_cli(*["finalize", "--output", out, INMEM]) == 1
    text = capsys.readouterr().out
    assert f"case object {victim3} has 100 bytes, its marker says" in text
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert {f["case_id"]: f["reason"] for f in meta["cases"]["failed"]} == {2: "damaged_case_object",
                                                                           3: "damaged_case_object"}
    assert run_cli(*["--input", dataset, "--output", out, "--cases", "1-4", INMEM]) == 0
    assert run_cli(*["verify", "--output", out]) == 0
    assert json.load(open(f"{out}/preprocessing_metadata.json"))["cases"]["ok"] == [1, 2, 3, 4]
