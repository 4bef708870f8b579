"""Recordings from other monitors (track maps) and time since measurement."""
import json
import re

import numpy as np
import pytest

from conftest import INMEM, TO_INTELLIVUE, read_examples, run_cli
from pipeline import sample, storage
from transforms import features, spec, trackmap

# The same signals as VitalDB's Solar 8000 writes them, under IntelliVue's names.
CASES = [1, 2, 3, 4, 5, 6]


def split_values(out):
    files = [f for s in spec.SPLIT_NAMES for f in storage.list_files(storage.split_files_glob(out, s))]
    return files, {(int(e["case_id"][0]), int(e["window_start"][0])): e for e in read_examples(files)}


def test_intellivue_files_with_the_shipped_map_equal_vitaldb_files_value_for_value(tmp_path, capsys):
    vitaldb_dir, intellivue_dir = str(tmp_path / "vitaldb"), str(tmp_path / "intellivue")
    sample.write_sample(vitaldb_dir, CASES, 1500)
    sample.write_sample(intellivue_dir, CASES, 1500, rename=TO_INTELLIVUE)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli("--input", vitaldb_dir, "--output", a, INMEM) == 0
    # Without the map the IntelliVue files give no blood pressure or heart rate at all ...
    assert run_cli("--input", intellivue_dir, "--output", str(tmp_path / "nomap"), INMEM) == 0
    q = json.load(open(tmp_path / "nomap" / "report" / "quality.json"))
    assert q["features"][0]["rules"]["no_data_default"] == 1.0
    # ... with it, the same windows, value for value.
    assert run_cli("--input", intellivue_dir, "--output", b, "--tracks", "intellivue", INMEM) == 0
    files_a, va = split_values(a)
    files_b, vb = split_values(b)
    assert va.keys() == vb.keys() and len(va) > 100
    for k in va:
        for f in ("timeseries", "static", "targets"):
            np.testing.assert_array_equal(va[k][f], vb[k][f])
    assert [open(f, "rb").read() for f in files_a] == [open(f, "rb").read() for f in files_b]
    meta = json.load(open(f"{b}/preprocessing_metadata.json"))
    hr = meta["spec"]["timeseries"][0]
    assert [s["track"] for s in hr["sources"]] == ["Solar8000/HR", "Intellivue/HR", "Intellivue/ECG_HR"]
    assert meta["settings"]["tracks"]["features"]["HR"]["add"] == "after"
    q = json.load(open(f"{b}/report/quality.json"))
    assert q["features"][0]["sources"] == {"Solar8000/HR": 0.0, "Intellivue/HR": 1.0, "Intellivue/ECG_HR": 0.0}
    bp = {s: v for s, v in q["features"][1]["sources"].items() if v}
    assert set(bp) <= {"Intellivue/ABP_SYS", "Intellivue/NIBP_SYS"} and bp["Intellivue/ABP_SYS"] > 0.5
    # The map is part of the fingerprint: the same output refuses a run without it.
    capsys.readouterr()
    assert run_cli("--input", intellivue_dir, "--output", b, INMEM) == 2
    assert "tracks" in capsys.readouterr().err


@pytest.mark.parametrize("doc,named", [
    ({"features": {"HeartRate": {"sources": [{"track": "X/HR", "unit": "/min"}]}}}, "unknown feature 'HeartRate'"),
    ({"features": {"HR": {"sources": [{"track": "X/HR", "unit": "/min", "divisor": "bsa"}]}}},
     "features.HR.sources[0] (X/HR): unknown divisor 'bsa'"),
    ({"features": {"HR": {"sources": [{"track": "X/HR", "unit": "/min", "factor": 0}]}}},
     "features.HR.sources[0] (X/HR): factor 0 must be a positive number"),
    ({"features": {"HR": {"sources": [{"track": "X/HR", "unit": "/min", "factor": -2}]}}}, "factor -2"),
    ({"features": {"HR": {"sources": [{"track": "X/HR", "unit": "/min"}]},
                   "RR": {"sources": [{"track": "X/HR", "unit": "/min"}]}}},
     "features.RR.sources[0]: track X/HR is listed twice (also under features.HR)"),
    ({"features": {"HR": {"sources": [{"track": "Solar8000/HR", "unit": "/min"}]}}},
     "track Solar8000/HR is listed twice (it is a built-in source of HR"),
    ({"features": {"HR": {"add": "instead", "sources": [{"track": "X/HR", "unit": "/min"}]}}}, "add 'instead'"),
    ({"features": {"HR": {"sources": [{"track": "HR", "unit": "/min"}]}}}, "must be a full Device/TRACK name"),
    ({"features": {"HR": {"sources": [{"track": "X/HR"}]}}}, "'unit' (the raw unit the device records) is missing"),
])
def test_a_bad_track_map_is_refused_before_any_work_naming_the_entry(doc, named, tmp_path, capsys):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(trackmap.TrackMapError) as err:
        trackmap.load(str(path))
    assert named in str(err.value)
    out = tmp_path / "o"
    assert run_cli("--input", str(tmp_path), "--output", str(out), "--tracks", str(path), INMEM) == 2
    assert named in capsys.readouterr().err and not out.exists()


def test_replace_and_before_place_the_sources_and_the_divisors_apply():
    tm = trackmap.parse({"features": {
        "BP_SYS": {"add": "replace", "sources": [{"track": "M/NIBP", "unit": "mmHg"}, {"track": "M/ART", "unit": "mmHg"}]},
        "HR": {"add": "before", "sources": [{"track": "M/HR", "unit": "/min"}]},
        "TV": {"sources": [{"track": "V/TV", "unit": "mL", "divisor": "ibw"}]},
        "Propofol_INF": {"sources": [{"track": "P/PPF10", "unit": "mL/h", "factor": 10, "divisor": "weight"}]}}})
    fs = tm.apply()
    assert [s.track for s in fs.feature("BP_SYS").sources] == ["M/NIBP", "M/ART"]
    assert [s.track for s in fs.feature("HR").sources] == ["M/HR", "Solar8000/HR"]
    raw = np.full((1, len(fs.source_tracks)), np.nan)
    raw[0, fs.source_tracks.index("P/PPF10")] = 10.0  # 10 mL/h of 10 mg/mL at 50 kg = 2 mg/kg/h
    raw[0, fs.source_tracks.index("V/TV")] = 450.0
    v, src = features.select_sources(raw, 50.0, 75.0, fs)
    assert v[0, fs.feature_names.index("Propofol_INF")] == pytest.approx(2.0)
    assert v[0, fs.feature_names.index("TV")] == pytest.approx(6.0)
    assert src[0, fs.feature_names.index("TV")] == 2  # after the two built-in TV sources
    assert trackmap.parse(tm.as_json()) == tm  # the normalised form reads back the same


def test_since_measured_against_hand_computed_values():
    T = 1300
    measured = np.zeros((T, 3), bool)
    measured[[3, 5, 6], 0] = True
    measured[0, 1] = True
    s = features.since_measured(measured) * 600
    assert s[:3, 0].tolist() == [600, 600, 600]  # never measured yet: 1.0
    assert s[3:10, 0].tolist() == [0, 1, 0, 0, 1, 2, 3]  # measured 0, carried seconds count up
    assert s[6 + 599, 0] == 599 and s[6 + 600, 0] == 600 and s[T - 1, 0] == 600  # after the last: capped
    assert s[0, 1] == 0 and s[600, 1] == 600 and (s[:, 2] == 600).all()  # column 2 never measured
    assert features.since_measured(measured).dtype == np.float32


def test_emit_delta_through_the_pipeline(dataset, tmp_path, capsys):
    import tensorflow as tf
    out = str(tmp_path / "o")
    assert run_cli("--input", dataset, "--output", out, "--cases", "1", "--emit-delta", "--emit-mask", INMEM) == 0
    feats = {"since_measured": tf.io.FixedLenFeature([4800], tf.float32),
             "observed": tf.io.FixedLenFeature([4800], tf.float32)}
    files = [f for s in spec.SPLIT_NAMES for f in storage.list_files(storage.split_files_glob(out, s))]
    ex = read_examples(files, feats)
    since = np.stack([e["since_measured"] for e in ex]).reshape(-1, 300, 16)
    obs = np.stack([e["observed"] for e in ex]).reshape(-1, 300, 16)
    assert ((since == 0) == (obs == 1)).all()  # 0 exactly at the measured seconds
    assert since.min() >= 0 and since.max() <= 1
    hr = since[:, :, 0] * 600  # HR every 2 s with a few drop-outs: mostly 0 or 1 s old
    assert np.isin(np.round(hr), [0, 1]).mean() > 0.9
    assert (since[:, :, 14] == 1).all() or since[:, :, 14].max() == 1  # etSEV: never or long ago
    schema = open(f"{out}/schema.pbtxt").read()
    assert 'name: "since_measured"' in schema
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["settings"]["emit_delta"] is True and meta["format"]["features"]["since_measured"]["length"] == 4800
    from pipeline.cli import main
    capsys.readouterr()
    assert main(["inspect", out, "--examples", "1"]) == 0
    shown = capsys.readouterr().out
    assert "[N s] = seconds since measured" in shown and "* = imputed" in shown
    hr_row = next(line for line in shown.splitlines() if line.strip().startswith("HR "))
    assert re.search(r"\[\s*[01] s\]", hr_row)  # HR is at most a second old
