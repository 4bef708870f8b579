"""The generator looks like VitalDB: each case's tracks in VitalDB's shares
of cases per track, clinical rows with VitalDB's columns, vocabularies and
proportions, a trks.csv like the API's track table (which the web API's
stand-in serves), one random stream per case and seed."""
import gzip
import math
import os
import re
import shutil
import urllib.request

import numpy as np
import pandas as pd
import pytest
import vitaldb
from conftest import TO_INTELLIVUE
from webstandin import StandIn

from pipeline.tools import sample

# VitalDB's numbers, from its API's /trks and its clinical table (6,388 cases).
CASES = 6388
TRACK_CASES = {"Orchestra/NEPI_RATE": 88, "Orchestra/PPF20_RATE": 3512, "Orchestra/RFTN20_RATE": 4773,
               "Orchestra/RFTN50_RATE": 68, "Solar8000/ART_MBP": 3724, "BIS/BIS": 5867,
               "Solar8000/VENT_MEAS_PEEP": 98, "Primus/EXP_SEVO": 3687, "Primus/SET_TV_L": 5964,
               "Primus/SET_INTER_PEEP": 5980, "Primus/SET_FIO2": 6047, "Primus/SET_RR_IPPV": 5980,
               "Solar8000/VENT_SET_TV": 4253, "Solar8000/VENT_SET_FIO2": 2212, "Solar8000/VENT_SET_PCP": 2745,
               "Solar8000/HR": 6387, "Solar8000/NIBP_MBP": 5763, "EV1000/ART_MBP": 592}
ANE_TYPE_CASES = {"General": 6043, "Spinal": 273, "Sedationalgesia": 72}
DEPARTMENT_CASES = {"General surgery": 4930, "Thoracic surgery": 1111, "Gynecology": 230, "Urology": 117}
UNDER_18, BLANK_ASA = 57, 133
COLUMNS = ["caseid", "subjectid", "casestart", "caseend", "anestart", "aneend", "opstart", "opend", "age", "sex",
           "height", "weight", "bmi", "asa", "emop", "department", "optype", "dx", "opname", "approach", "ane_type"]
N = 5000  # cases drawn: 4 standard errors of a 1.4 % share are 0.66 points


def close(share: float, cases: int, total: int = CASES, n: int = N) -> bool:
    """`share` of n draws is within 4 standard errors of VitalDB's cases / total."""
    p = cases / total
    return abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def inventories() -> list[tuple[str, ...]]:
    return [sample.case_tracks(c) for c in range(1, N + 1)]


def test_each_tracks_share_of_cases_is_vitaldbs(inventories):
    shares = {t: sum(t in inv for inv in inventories) / N for t in TRACK_CASES}
    for track, cases in TRACK_CASES.items():
        assert close(shares[track], cases), (track, shares[track], cases / CASES)
    assert 0 < shares["Orchestra/NEPI_RATE"] < 0.025  # noradrenaline is rare
    assert 0.50 < shares["Orchestra/PPF20_RATE"] < 0.60 and 0.54 < shares["Solar8000/ART_MBP"] < 0.62


def test_tracks_that_come_together_in_vitaldb_come_together(inventories):
    with_ppf = [inv for inv in inventories if "Orchestra/PPF20_RATE" in inv]
    assert sum("Orchestra/RFTN20_RATE" in inv for inv in with_ppf) / len(with_ppf) > 0.96  # VitalDB: 3,456 of 3,512
    assert not [inv for inv in inventories if {"Orchestra/RFTN20_RATE", "Orchestra/RFTN50_RATE"} <= set(inv)]
    art = {("Solar8000/ART_SBP" in inv, "Solar8000/ART_DBP" in inv, "Solar8000/ART_MBP" in inv) for inv in inventories}
    assert art == {(True, True, True), (False, False, False)}  # one arterial line, three values
    sevo = [("Primus/EXP_SEVO" in inv) == ("Primus/INSP_SEVO" in inv) for inv in inventories]
    assert all(sevo)
    assert all(t in sample.TRACK_ORDER for inv in inventories for t in inv)
    assert all("/" in t for t in sample.TRACK_ORDER)  # devices are conditions, not tracks


def test_one_stream_per_case_decides_tracks_row_and_signals():
    for cid in (1, 2, 7):
        vf, row = sample.generate_case(cid, 1800)
        assert vf.get_track_names() == list(sample.case_tracks(cid))  # every drawn track has records
        assert row == sample.plan_case(cid, 1800).row
        again, row2 = sample.generate_case(cid, 1800)
        assert row2 == row and again.get_track_names() == vf.get_track_names()
        names = vf.get_track_names()
        np.testing.assert_array_equal(again.to_numpy(names, 1), vf.to_numpy(names, 1))
    # The duration does not move the tracks or the patient; another seed is another case.
    assert sample.plan_case(3, 900).tracks == sample.plan_case(3).tracks
    assert sample.plan_case(3, 900).row["height"] == sample.plan_case(3).row["height"]
    others = [sample.plan_case(c, seed=sample.SEED + 1) for c in range(1, 21)]
    assert [p.tracks for p in others] != [sample.plan_case(c).tracks for c in range(1, 21)]
    assert sample.plan_case(1).duration in range(2400, 5401, 60)


def test_clinical_rows_have_vitaldbs_vocabularies_and_proportions():
    rows = pd.DataFrame([sample.plan_case(c).row for c in range(1, N + 1)])
    assert list(rows.columns) == COLUMNS
    for kind, cases in ANE_TYPE_CASES.items():
        assert close((rows["ane_type"] == kind).mean(), cases), kind
    for dept, cases in DEPARTMENT_CASES.items():
        assert close((rows["department"] == dept).mean(), cases), dept
    assert set(rows["approach"]) == {"Open", "Videoscopic", "Robotic"}
    assert close((rows["age"] < 18).mean(), UNDER_18) and (rows["age"] < 18).any() and rows["age"].min() >= 0.3
    assert close(rows["asa"].isna().mean(), BLANK_ASA) and set(rows["asa"].dropna()) == {1, 2, 3, 4, 6}
    assert set(rows.loc[rows["department"] == "Gynecology", "sex"]) == {"F"}
    assert set(rows.loc[rows["opname"] == "Radical prostatectomy", "sex"]) == {"M"}
    assert rows["dx"].str.contains(", ").mean() > 0.05  # "Colon cancer, sigmoid"
    # Spinal anaesthesia seldom has a pump (VitalDB: 17 of 273).
    pumps = [any(t in sample.PUMP_TRACKS for t in sample.case_tracks(c)) for c in rows["caseid"]]
    spinal = rows["ane_type"] == "Spinal"
    assert np.mean(np.array(pumps)[spinal]) < 0.2 < np.mean(np.array(pumps)[~spinal])
    # A patient's operations share sex and height.
    assert rows.groupby("subjectid")[["sex", "height"]].nunique().max().tolist() == [1, 1]
    adults = rows[rows["age"] >= 18]
    assert 166 < adults.loc[adults["sex"] == "M", "height"].mean() < 170  # VitalDB: 168.3 (M), 156.5 (F)
    assert 154 < adults.loc[adults["sex"] == "F", "height"].mean() < 159


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("default-sample"))
    sample.write_default_sample(folder)
    return folder


def test_the_clinical_csv_has_vitaldbs_columns_and_quoted_commas(default_sample):
    text = open(f"{default_sample}/clinical_data.csv").read()
    assert text.splitlines()[0].split(",") == COLUMNS
    quoted = re.findall(r'"([^"]*,[^"]*)"', text)
    assert quoted and all(", " in q for q in quoted)
    df = pd.read_csv(f"{default_sample}/clinical_data.csv")
    assert list(df.columns) == COLUMNS and len(df) == 20
    assert set(quoted) <= set(df["dx"])  # read back whole, not split at the comma
    ids = sample.sample_case_ids(20)
    assert df["caseid"].tolist() == ids
    by_id = df.set_index("caseid")
    assert math.isnan(by_id.loc[ids[1], "weight"]) and math.isnan(by_id.loc[ids[2], "asa"])
    assert by_id.loc[ids[3], "weight"] == sample.IMPLAUSIBLE_WEIGHT_KG and by_id.loc[ids[-1], "caseend"] == 240
    assert df["subjectid"].value_counts().max() == 3 and (df["subjectid"].value_counts() == 2).any()
    assert set(df["department"]) <= set(DEPARTMENT_CASES) and set(df["ane_type"]) <= set(ANE_TYPE_CASES)
    assert (df["casestart"] == 0).all() and (df["anestart"] < df["opstart"]).all()
    assert (df["opstart"] < df["opend"]).all() and (df["opend"] < df["aneend"]).all()


def read_trks(folder: str) -> pd.DataFrame:
    return pd.read_csv(f"{folder}/{sample.TRKS_FILE}")


def file_tracks(folder: str, cid: int) -> set[str]:
    """The tracks in a case's file (<id:04d>.vital, or <id>.vital)."""
    name = f"{cid:04d}.vital" if os.path.exists(f"{folder}/{cid:04d}.vital") else f"{cid}.vital"
    return set(vitaldb.VitalFile(f"{folder}/{name}").get_track_names())


def test_trks_csv_lists_the_tracks_in_each_written_file(default_sample):
    trks = read_trks(default_sample)
    assert list(trks.columns) == ["caseid", "tname", "tid"]
    assert trks["tid"].str.fullmatch(r"[0-9a-f]{40}").all() and trks["tid"].is_unique
    ids = sample.sample_case_ids(20)
    assert sorted(set(trks["caseid"])) == ids
    for cid in ids:
        assert set(trks.loc[trks["caseid"] == cid, "tname"]) == file_tracks(default_sample, cid), cid
    twice = trks[trks.duplicated(["caseid", "tname"], keep=False)]
    first_bt = next(c for c in ids if sample.TRACKED_TWICE in sample.case_tracks(c))
    assert twice["tname"].tolist() == [sample.TRACKED_TWICE] * 2 and set(twice["caseid"]) == {first_bt}
    # The too-short case lists what its file has: its arterial line, drawn, records nothing in 4 min.
    short = ids[-1]
    art = {t for t in sample.case_tracks(short) if t.startswith("Solar8000/ART_")}
    assert art and not art & file_tracks(default_sample, short)


def test_trks_csv_follows_renamed_tracks_and_the_case_without_a_row(tmp_path):
    folder = str(tmp_path)
    sample.write_sample(folder, [1, 2, 3], 600, rename=TO_INTELLIVUE, no_clinical_row=2)
    trks = read_trks(folder)
    assert "Intellivue/HR" in set(trks["tname"]) and "Solar8000/HR" not in set(trks["tname"])
    assert sorted(set(trks["caseid"])) == [1, 2, 3]  # the API lists files, rows or not
    assert pd.read_csv(f"{folder}/clinical_data.csv")["caseid"].tolist() == [1, 3]
    for cid in (1, 2, 3):
        assert set(trks.loc[trks["caseid"] == cid, "tname"]) == file_tracks(folder, cid)


def get(url: str) -> tuple[dict, bytes]:
    with urllib.request.urlopen(url) as r:
        return dict(r.headers), r.read()


def test_the_standin_serves_trks_like_the_api(tmp_path):
    folder = str(tmp_path / "api")
    sample.write_sample(folder, [1, 2, 3, 4], 600)
    written = open(f"{folder}/{sample.TRKS_FILE}", "rb").read()
    with StandIn(folder) as api:
        headers, body = get(f"{api.url}/trks")
        assert headers["Content-Encoding"] == "gzip" and headers["Content-Type"] == "text/csv"
        assert int(headers["Content-Length"]) == len(body) and gzip.decompress(body) == written
        served = pd.read_csv(f"{api.url}/trks")  # as the vitaldb library reads it
        pd.testing.assert_frame_equal(served, read_trks(folder))
        # Without a trks.csv: the tracks of the files served, one row each.
        os.remove(f"{folder}/{sample.TRKS_FILE}")
        shutil.copy(f"{folder}/0001.vital", f"{folder}/17.vital")
        open(f"{folder}/0018.vital", "wb").write(b"PK\x03\x04 not a vital file")
        derived = pd.read_csv(f"{api.url}/trks")
        assert api.requests["/trks"] == 3
    assert sorted(set(derived["caseid"])) == [1, 2, 3, 4, 17]  # the broken file lists nothing
    for cid in (1, 2, 3, 4, 17):
        assert set(derived.loc[derived["caseid"] == cid, "tname"]) == file_tracks(folder, cid)
    assert not derived.duplicated(["caseid", "tname"]).any() and derived["tid"].is_unique
    assert derived["tid"].str.fullmatch(r"[0-9a-f]{40}").all()
