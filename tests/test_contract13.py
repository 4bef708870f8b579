"""Contract 1.3: anaesthesia times (anestart, aneend) that are clinical entry
errors count as missing, and the case lists them like the static entry errors."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from conftest import INMEM, run_cli, split_bytes

from pipeline.tools import sample
from transforms import per_case, spec
from transforms.per_case import anaesthesia_period, crop_bounds, process_case
from transforms.settings import Settings
from transforms.windows import window_count

ANEEND_4476 = -3691470416  # real VitalDB case 4476 (anestart -2156, caseend 19501)


def test_the_contract_version_is_1_3():
    assert spec.SPEC_VERSION == "1.3" and spec.spec_as_dict()["spec_version"] == "1.3"


@pytest.mark.parametrize("row,T,bounds,errors", [
    # 4476: aneend is an entry error -> the recording's end; anestart -2156 -> its start.
    ({"anestart": -2156, "aneend": ANEEND_4476}, 19501, (0, 19501), {"aneend": ANEEND_4476}),
    ({"anestart": 600, "aneend": ANEEND_4476}, 19501, (600, 19501), {"aneend": ANEEND_4476}),
    ({"anestart": 600.0, "aneend": float(ANEEND_4476)}, 5000, (600, 5000), {"aneend": float(ANEEND_4476)}),
    # anestart past two days: an entry error, the recording's start.
    ({"anestart": 172801, "aneend": 5000}, 6000, (0, 5000), {"anestart": 172801}),
    ({"anestart": -86401, "aneend": 5000}, 6000, (0, 5000), {"anestart": -86401}),
    ({"anestart": 300, "aneend": 172800.5}, 6000, (300, 6000), {"aneend": 172800.5}),
    # aneend not after anestart, both plausible: both are entry errors -> the whole recording.
    ({"anestart": 3000, "aneend": 2000}, 6000, (0, 6000), {"anestart": 3000, "aneend": 2000}),
    ({"anestart": 3000, "aneend": 3000}, 6000, (0, 6000), {"anestart": 3000, "aneend": 3000}),
    ({"anestart": -500, "aneend": -900}, 6000, (0, 6000), {"anestart": -500, "aneend": -900}),
    # One bound an entry error, the other plausible: no ordering check, the plausible one is kept.
    ({"anestart": 3000, "aneend": -100000}, 6000, (3000, 6000), {"aneend": -100000}),
    # Not a number: an entry error like a static column's (contract 1.1); blank: missing, no error.
    ({"anestart": "n/a", "aneend": 4000}, 6000, (0, 4000), {"anestart": "n/a"}),
    ({"anestart": None, "aneend": float("nan")}, 6000, (0, 6000), {}),
    ({"anestart": "  ", "aneend": 4000}, 6000, (0, 4000), {}),
    # Plausible: clipped as before (VitalDB: anestart mostly negative, aneend past caseend).
    ({"anestart": -552, "aneend": 10848}, 10000, (0, 10000), {}),
    ({"anestart": -86400, "aneend": 172800}, 10000, (0, 10000), {}),
    ({"anestart": 100.4, "aneend": 5000.2}, 10000, (100, 5001), {}),
    ({"anestart": 7000, "aneend": 9000}, 6000, (0, 0), {}),  # the anaesthesia after the recording: too short
])
def test_crop_bounds_and_the_anaesthesia_entry_errors(row, T, bounds, errors):
    assert crop_bounds(T, row) == bounds
    assert anaesthesia_period(row)[2] == errors
    assert crop_bounds(T, None) == (0, T) and anaesthesia_period(None) == (None, None, {})


def _crop_bounds_1_2(T, row):
    """crop_bounds as contract 1.2 had it, for rows without entry errors."""
    def number(v):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None
    a, b = number(row.get("anestart")), number(row.get("aneend"))
    lo = max(0, int(np.floor(a))) if a is not None else 0
    hi = min(T, int(np.ceil(b))) if b is not None else T
    return (lo, hi) if hi > lo else (0, 0)


def test_rows_without_entry_errors_crop_as_in_1_2():
    """Every real anaesthesia period but 4476's is plausible: their crops are unchanged."""
    rng = np.random.default_rng(13)
    for _ in range(2000):
        T = int(rng.integers(200, 40000))
        a = float(rng.uniform(-86400, 172800))
        b = float(rng.uniform(a + 1e-6, 172800))
        for row in ({"anestart": a, "aneend": b}, {"anestart": int(a), "aneend": int(b) + 1},
                    {"anestart": a}, {"aneend": b}, {}):
            assert anaesthesia_period(row)[2] == {}
            assert crop_bounds(T, row) == _crop_bounds_1_2(T, row), (T, row)


def _raw(T: int, fs: spec.FeatureSpec = spec.DEFAULT_SPEC) -> np.ndarray:
    """Raw tracks of a case: HR every 2 s, a Primus TV every 7 s, values that change over time."""
    raw = np.full((T, len(fs.source_tracks)), np.nan)
    t = np.arange(T)
    hr = fs.source_tracks.index("Solar8000/HR")
    raw[::2, hr] = 60 + (t[::2] % 97)
    tv = fs.source_tracks.index("Primus/TV")
    raw[::7, tv] = 400 + (t[::7] % 50)
    return raw


ROW = {"caseid": 4476, "subjectid": 1846, "age": 51, "sex": "F", "height": 158.9, "weight": 43.5, "bmi": 17.2,
       "asa": 2, "caseend": 1500}


def test_a_4476_like_case_with_crop_anaesthesia_uses_its_whole_recording_and_lists_the_error():
    T = 1500
    raw = _raw(T)
    row = dict(ROW, anestart=-2156, aneend=ANEEND_4476)
    crop = Settings(crop_anaesthesia=True)
    cw = process_case(4476, raw, row, crop, split_key="4476")
    n = window_count(T)
    assert n == 40 and cw.facts.windows == n  # not too short: floor((1500 - 301) / 30) + 1
    np.testing.assert_array_equal(cw.starts, np.arange(0, 30 * n, 30))
    assert (cw.facts.used_from_s, cw.facts.used_seconds, cw.facts.duration_s) == (0, T, T)
    assert cw.facts.static_implausible == {"aneend": ANEEND_4476}
    assert cw.facts.static_defaults == []  # not a static feature
    assert json.loads(json.dumps(cw.facts.static_implausible)) == {"aneend": ANEEND_4476}
    # The same examples as the whole recording without a crop, and as a row without the times.
    for other in (process_case(4476, raw, row, Settings(), split_key="4476"),
                  process_case(4476, raw, ROW, crop, split_key="4476")):
        for name in ("starts", "timeseries", "targets", "static"):
            np.testing.assert_array_equal(getattr(cw, name), getattr(other, name))
    # Listed also without --crop-anaesthesia: it is a fact of the clinical row.
    plain = process_case(4476, raw, row, Settings(), split_key="4476")
    assert plain.facts.static_implausible == {"aneend": ANEEND_4476}
    # Next to the static entry errors, which keep their own listing.
    bad = process_case(4476, raw, dict(row, weight=900.0, bmi=None), crop, split_key="4476").facts
    assert bad.static_implausible == {"weight": 900.0, "aneend": ANEEND_4476}
    assert bad.static_defaults == ["weight", "bmi"]


def test_a_plausible_anaesthesia_period_is_cropped_as_before():
    T = 1500
    raw = _raw(T)
    row = dict(ROW, anestart=120.5, aneend=1450)
    cw = process_case(7, raw, row, Settings(crop_anaesthesia=True), split_key="7")
    assert (cw.facts.used_from_s, cw.facts.used_seconds) == (120, 1330)
    assert cw.facts.static_implausible == {}
    assert cw.facts.windows == window_count(1330) == 35
    np.testing.assert_array_equal(cw.starts, 120 + np.arange(0, 30 * 35, 30))
    # the cropped rows, imputed on their own
    cropped = process_case(7, raw[120:1450], dict(ROW), Settings(), split_key="7")
    np.testing.assert_array_equal(cw.timeseries, cropped.timeseries)
    np.testing.assert_array_equal(cw.targets, cropped.targets)
    # Both entry errors (aneend before anestart): the whole recording.
    both = process_case(7, raw, dict(ROW, anestart=1450, aneend=120.5), Settings(crop_anaesthesia=True),
                        split_key="7")
    assert (both.facts.used_from_s, both.facts.used_seconds, both.facts.windows) == (0, T, 40)
    assert both.facts.static_implausible == {"anestart": 1450, "aneend": 120.5}


CASES = [1, 2, 3]


def test_the_run_lists_the_anaesthesia_entry_error_and_keeps_other_files_byte_identical(tmp_path, capsys):
    """Through the command line: case 2's aneend as 4476's. With --crop-anaesthesia
    case 2 is used from its anestart to the recording's end, and the summary, metadata and quality report
    list the entry error; without the crop, the split files are byte for byte
    those of the unchanged table."""
    clean, broken = str(tmp_path / "clean"), str(tmp_path / "broken")
    sample.write_sample(clean, CASES, 1500)
    sample.write_sample(broken, CASES, 1500)
    table = os.path.join(broken, "clinical_data.csv")
    df = pd.read_csv(table)
    df.loc[df["caseid"] == 2, "aneend"] = ANEEND_4476
    df.to_csv(table, index=False)
    anestart = int(df.loc[df["caseid"] == 1, "anestart"].iloc[0])
    aneend = int(df.loc[df["caseid"] == 1, "aneend"].iloc[0])
    assert (anestart, aneend) == (60, 1440)  # the generated period lies inside the recording

    out = str(tmp_path / "crop")
    capsys.readouterr()
    assert run_cli("--input", broken, "--output", out, "--crop-anaesthesia", INMEM) == 0
    shown = capsys.readouterr().out
    assert f"case 2: clinical entry error(s) treated as missing: aneend={ANEEND_4476!r}" in shown
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["settings"]["spec_version"] == "1.3" and meta["settings"]["crop_anaesthesia"] is True
    assert meta["cases"]["static_implausible"] == {"2": {"aneend": ANEEND_4476}}
    assert "2" not in meta["cases"]["static_defaults"]
    q = json.load(open(f"{out}/report/quality.json"))
    windows = {c["case_id"]: c["windows"] for c in q["cases"]}
    # Case 2 from its (plausible) anestart to the recording's end; 1 and 3 cropped to both bounds.
    assert windows == {1: window_count(aneend - anestart), 2: window_count(1500 - anestart),
                       3: window_count(aneend - anestart)}
    assert windows == {1: 36, 2: 38, 3: 36}
    assert f"aneend={ANEEND_4476!r}" in open(f"{out}/report/index.html").read()

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli("--input", clean, "--output", a, INMEM) == 0
    assert run_cli("--input", broken, "--output", b, INMEM) == 0
    files = split_bytes(a)
    assert files and split_bytes(b) == files
    meta_b = json.load(open(f"{b}/preprocessing_metadata.json"))
    assert meta_b["cases"]["static_implausible"] == {"2": {"aneend": ANEEND_4476}}  # listed without the crop too
    assert json.load(open(f"{a}/preprocessing_metadata.json"))["cases"]["static_implausible"] == {}


def test_the_anaesthesia_range_is_the_contracts():
    assert per_case.ANAESTHESIA_PLAUSIBLE_S == (-86400.0, 172800.0)
    contract = open(os.path.join(os.path.dirname(__file__), "..", "docs", "data-contract.md")).read()
    assert "[−86400, 172800]" in contract and "Version 1.3" in contract
