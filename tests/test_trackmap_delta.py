"""Recordings from other monitors (track maps) and time since measurement."""
import dataclasses
import json
import os
import re

import numpy as np
import pytest
from conftest import INMEM, TO_INTELLIVUE, read_examples, run_cli

from pipeline.io.documents import load_track_map
from pipeline.output import storage
from pipeline.tools import sample
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
    ({"features": {"HR": {"sources": [{"track": "X/HR", "unit": "/min", "plausible": [300, 20]}]}}},
     "features.HR.sources[0] (X/HR): plausible [300, 20] must have lo < hi"),
    ({"features": {"HR": {"sources": [{"track": "X/HR", "unit": "/min", "plausible": "high"}]}}},
     "plausible must be [lo, hi]"),
])
def test_a_bad_track_map_is_refused_before_any_work_naming_the_entry(doc, named, tmp_path, capsys):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(trackmap.TrackMapError) as err:
        load_track_map(str(path))
    assert named in str(err.value)
    out = tmp_path / "o"
    assert run_cli("--input", str(tmp_path), "--output", str(out), "--tracks", str(path), INMEM) == 2
    assert named in capsys.readouterr().err and not out.exists()


def test_replace_and_before_place_the_sources_and_the_divisors_apply():
    tm = trackmap.parse({"features": {
        "BP_SYS": {"add": "replace",
                   "sources": [{"track": "M/NIBP", "unit": "mmHg"}, {"track": "M/ART", "unit": "mmHg"}]},
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


def test_the_shipped_ventilator_settings_map_puts_the_set_values_first():
    assert "ventilator-settings" in trackmap.shipped()
    fs = load_track_map("ventilator-settings").apply()
    base = spec.DEFAULT_SPEC
    expected = {  # feature: [(track, unit, factor, divisor)] of the SET sources, before the built-in ones
        "TV": [("Primus/SET_TV_L", "L", 1000.0, spec.PER_IBW), ("Solar8000/VENT_SET_TV", "mL", 1.0, spec.PER_IBW)],
        "PEEP": [("Primus/SET_INTER_PEEP", "mbar", spec.CMH2O_PER_HPA, spec.PER_NONE)],
        "FIO2": [("Primus/SET_FIO2", "%", 1.0, spec.PER_NONE), ("Solar8000/VENT_SET_FIO2", "%", 1.0, spec.PER_NONE)],
        "RR": [("Primus/SET_RR_IPPV", "/min", 1.0, spec.PER_NONE)],
    }
    for f, b in zip(fs.timeseries, base.timeseries):
        n = len(expected.get(f.name, []))
        assert [(s.track, s.unit, s.factor, s.per) for s in f.sources[:n]] == expected.get(f.name, []), f.name
        assert f.sources[n:] == b.sources, f.name  # the measured sources follow, unchanged
        assert dataclasses.replace(f, sources=b.sources) == b  # plausible range, rules, norm: the feature's own
    # SET_TV_L is in litres: its own plausible range, 0..2 L (the feature's 0..2000 mL); the others the feature's.
    assert fs.feature("TV").sources[0].plausible == (0.0, 2.0)
    assert all(s.plausible is None for f in fs.timeseries for s in f.sources if s.track != "Primus/SET_TV_L")
    raw = np.full((3, len(fs.source_tracks)), np.nan)
    tv = fs.feature("TV")
    raw[:, fs.source_tracks.index("Primus/SET_TV_L")] = [0.5, 3.0, np.nan]  # 3 L: an artifact
    raw[:, fs.source_tracks.index("Primus/TV")] = 450.0
    values, source = features.select_sources(raw, 70.0, 60.0, fs)
    j = fs.feature_names.index("TV")
    np.testing.assert_allclose(values[:, j], [500 / 60, 450 / 60, 450 / 60])
    assert [tv.sources[k].track for k in source[:, j]] == ["Primus/SET_TV_L", "Primus/TV", "Primus/TV"]
    # The same conversion as the built-in Primus PEEP source.
    assert fs.feature("PEEP").sources[0].factor == base.feature("PEEP").sources[1].factor == 1.01972


IBW_M180 = 50.0 + 0.9055 * (180 - 152.4)  # Devine, male, 180 cm
SET_UNTIL = 700  # case 1 has the SET tracks in its first 700 s only; case 2 has none


def _write_ventilated_case(folder, case_id: int, T: int, with_set: bool) -> None:
    """A ventilated case made with the vitaldb library: measured Primus tracks
    every 7 s (TV 450 mL, PEEP 4 mbar, FiO2 50 %, RR 14) and, with `with_set`,
    the ventilator's settings at the same seconds until SET_UNTIL (0.5 L,
    5 mbar, 60 %, 12 /min)."""
    import vitaldb
    vf = vitaldb.VitalFile()
    vf.dtstart = sample.DT0 + case_id * 86400.0
    vf.dtend = vf.dtstart + T

    def add(name, unit, times, value):
        vf.add_track(name, [{"dt": vf.dtstart + float(t), "val": float(value)} for t in times], unit=unit)

    add("Solar8000/HR", "/min", range(0, T, 2), 70)
    every7 = range(0, T, 7)
    for name, unit, value in (("TV", "mL", 450), ("PEEP_MBAR", "mbar", 4), ("FIO2", "%", 50), ("RR_CO2", "/min", 14)):
        add(f"Primus/{name}", unit, every7, value)
    if with_set:
        early = [t for t in every7 if t < SET_UNTIL]
        for name, unit, value in (("SET_TV_L", "L", 0.5), ("SET_INTER_PEEP", "mbar", 5), ("SET_FIO2", "%", 60),
                                  ("SET_RR_IPPV", "/min", 12)):
            add(f"Primus/{name}", unit, early, value)
    vf.to_vital(os.path.join(folder, f"{case_id:04d}.vital"))


def _per_second(examples, case_id: int, feature: str) -> dict:
    """{second from the recording start: clinical value} of one feature, decoded from the examples."""
    j = spec.DEFAULT_SPEC.feature_names.index(feature)
    out = {}
    for e in examples:
        if int(e["case_id"][0]) != case_id:
            continue
        s0 = int(e["window_start"][0])
        values = features.denormalise_feature(e["timeseries"].reshape(300, -1)[:, j], feature)
        out.update({s0 + i: float(v) for i, v in enumerate(values)})
    return out


def test_ventilator_settings_map_takes_the_set_tidal_volume_and_falls_back_to_the_measured_one(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    T = 1500
    _write_ventilated_case(str(folder), 1, T, with_set=True)
    _write_ventilated_case(str(folder), 2, T, with_set=False)
    import pandas as pd
    pd.DataFrame([{"caseid": c, "subjectid": 500 + c, "age": 60, "sex": "M", "height": 180, "weight": 80,
                   "bmi": 24.7, "asa": 2} for c in (1, 2)]).to_csv(folder / "clinical_data.csv", index=False)
    out, plain = str(tmp_path / "o"), str(tmp_path / "plain")
    assert run_cli("--input", str(folder), "--output", out, "--tracks", "ventilator-settings", INMEM) == 0
    assert run_cli("--input", str(folder), "--output", plain, INMEM) == 0
    files, by_key = split_values(out)
    ex = list(by_key.values())
    tv1, tv2 = _per_second(ex, 1, "TV"), _per_second(ex, 2, "TV")
    assert sorted(tv1) == sorted(tv2) == list(range(30 * 39 + 300))  # 40 windows: seconds 0 .. 1469
    assert IBW_M180 == pytest.approx(74.9918)
    # Case 1: the set 0.5 L = 500 mL per kg IBW while it is recorded, then the measured 450 mL.
    for s, v in tv1.items():
        assert v == pytest.approx((500.0 if s < SET_UNTIL else 450.0) / IBW_M180, abs=1e-5), s
    # Case 2 (no SET tracks): the measured value throughout, as without the map.
    assert all(v == pytest.approx(450.0 / IBW_M180, abs=1e-5) for v in tv2.values())
    for feature, set_value, measured in (("PEEP", 5 * 1.01972, 4 * 1.01972), ("FIO2", 60.0, 50.0), ("RR", 12.0, 14.0)):
        got = _per_second(ex, 1, feature)
        assert got[0] == pytest.approx(set_value, abs=1e-4) and got[SET_UNTIL - 1] == pytest.approx(set_value, abs=1e-4)
        assert got[SET_UNTIL] == pytest.approx(measured, abs=1e-4) and got[1469] == pytest.approx(measured, abs=1e-4)
    # Without the SET tracks the map changes no value: case 2's examples equal a run without it.
    _, by_key_plain = split_values(plain)
    for k, e in by_key.items():
        if k[0] == 2:
            for f in ("timeseries", "static", "targets"):
                np.testing.assert_array_equal(e[f], by_key_plain[k][f])
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert [s["track"] for s in meta["spec"]["timeseries"][10]["sources"]] == [
        "Primus/SET_TV_L", "Solar8000/VENT_SET_TV", "Solar8000/VENT_TV", "Primus/TV"]
    assert meta["settings"]["tracks"]["features"]["TV"]["add"] == "before"
    q = json.load(open(f"{out}/report/quality.json"))
    shares = q["features"][10]["sources"]
    assert shares["Primus/SET_TV_L"] > 0.2 and shares["Primus/TV"] > 0.5 and shares["Solar8000/VENT_SET_TV"] == 0.0
