"""pipeline.report.table1: the Table 1 per split, its numbers checked against values
computed here independently with numpy/pandas (medians, quartiles, counts,
percentages, missing counts, SMDs), on small hand-made clinical tables."""
from __future__ import annotations

import io
import json
import math
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from tableone import TableOne

from pipeline.report.table1 import build_table1

NAN = np.nan
SPLITS = ["train", "validation", "test"]
COLUMNS = ["caseid", "subjectid", "age", "sex", "height", "weight", "bmi", "asa", "department", "ane_type",
           "emop", "approach"]
# 11 rows of 12 cases: case 12 (test) has no clinical row; cases 1 and 2 are one patient.
ROWS = [
    (1, 100, 45, "M", 170, 70, 24.2, 1, "General surgery", "General", 0, "Open"),
    (2, 100, 52, "F", 160, 55, 21.5, 2, "General surgery", "General", 0, "Videoscopic"),
    (3, 3, 61, "M", 175, 80, 26.1, 2, "Thoracic surgery", "General", 1, "Open"),
    (4, 4, 70, "F", 155, 50, 20.8, 3, "Urology", "Spinal", 0, "Open"),
    (5, 5, 38, "M", 180, 90, 27.8, NAN, "General surgery", "General", 0, "Robotic"),
    (6, 6, NAN, "F", 165, 60, 22.0, 1, "Gynecology", "General", 0, "Videoscopic"),
    (7, 7, 66, "M", 172, 75, 25.4, 2, "General surgery", "General", 1, "Open"),
    (8, 8, 49, "F", 158, 52, 20.8, 3, "Thoracic surgery", "Spinal", 0, "Videoscopic"),
    (9, 9, 57, "M", 168, 68, 24.1, 2, "General surgery", "General", 0, "Open"),
    (10, 10, 73, "F", 150, 48, 21.3, 4, "Urology", "General", 1, "Open"),
    (11, 11, 44, "M", 178, 82, 25.9, 2, "General surgery", "General", 0, "Videoscopic"),
]
SPLIT_OF = {**{c: "train" for c in range(1, 7)}, **{c: "validation" for c in (7, 8, 9)},
            **{c: "test" for c in (10, 11, 12)}}
PATIENT_OF = {c: ("s100" if c in (1, 2) else f"s{c}") for c in range(1, 13)}
CONT = ["age", "height", "weight", "bmi"]
CAT = ["sex", "asa", "department", "ane_type", "emop", "approach"]


def clinical(rows=ROWS, columns=COLUMNS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


# ---- independent references ------------------------------------------------------------------------------

def values_of(df: pd.DataFrame, split_of: dict, split: str, column: str) -> np.ndarray:
    """The non-missing values of a column among a split's cases (one row per case)."""
    ids = [c for c, s in split_of.items() if s == split]
    col = pd.to_numeric(df.set_index("caseid").reindex(ids)[column], errors="coerce")
    return col.dropna().to_numpy(float)


def levels_of(df: pd.DataFrame, split_of: dict, split: str, column: str, fmt=str) -> dict:
    ids = [c for c, s in split_of.items() if s == split]
    col = df.set_index("caseid").reindex(ids)[column].dropna()
    return {fmt(k): int(v) for k, v in col.value_counts().items()}


def cont_smd(a: np.ndarray, b: np.ndarray) -> float:
    sa = np.std(a, ddof=1) if len(a) > 1 else 0.0
    sb = np.std(b, ddof=1) if len(b) > 1 else 0.0
    return abs(a.mean() - b.mean()) / math.sqrt((sa ** 2 + sb ** 2) / 2)


def cat_smd(c1: dict, c2: dict, levels=None) -> float:
    """Yang & Dalton's multi-level SMD, written as R's tableone does it, with a
    generalised inverse, here over all `levels` (none dropped: the result
    must not depend on that; a level neither split has adds nothing)."""
    levels = levels or sorted({k for k, v in c1.items() if v} | {k for k, v in c2.items() if v})
    p1 = np.array([c1.get(k, 0) for k in levels], float)
    p2 = np.array([c2.get(k, 0) for k in levels], float)
    p1, p2 = p1 / p1.sum(), p2 / p2.sum()
    s = ((np.diag(p1) - np.outer(p1, p1)) + (np.diag(p2) - np.outer(p2, p2))) / 2
    d = p1 - p2
    return float(math.sqrt(max(d @ np.linalg.pinv(s) @ d, 0.0)))


def binary_smd(p1: float, p2: float) -> float:
    return abs(p1 - p2) / math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / 2)


def asa_fmt(x) -> str:
    return str(int(x))


def emop_fmt(x) -> str:
    return "Y" if int(x) == 1 else "N"


FMT = {"asa": asa_fmt, "emop": emop_fmt}


def plain(obj) -> bool:
    """Only JSON's own Python types (no numpy scalars), recursively."""
    if obj is None or type(obj) in (bool, int, float, str):
        return not (type(obj) is float and not math.isfinite(obj))
    if type(obj) is list:
        return all(plain(x) for x in obj)
    if type(obj) is dict:
        return all(type(k) is str and plain(v) for k, v in obj.items())
    return False


# ---- tests -------------------------------------------------------------------------------------------------

def test_counts_and_patients_per_case():
    t = build_table1(clinical(), SPLIT_OF, PATIENT_OF, SPLITS)
    j = t.as_json()
    assert j["unit"] == "case"
    assert j["splits"] == SPLITS and j["reference"] == "train"
    assert j["cases"] == {"train": 6, "validation": 3, "test": 3}
    assert j["patients"] == {"train": 5, "validation": 3, "test": 3}  # cases 1 and 2: one patient
    assert j["no_clinical_row"] == {"train": 0, "validation": 0, "test": 1}
    assert list(j["variables"]) == ["age", "sex", "height", "weight", "bmi", "asa", "emop", "department",
                                    "ane_type", "approach"]


def test_continuous_values_match_numpy():
    df = clinical()
    j = build_table1(df, SPLIT_OF, PATIENT_OF, SPLITS).as_json()
    for var in CONT:
        v = j["variables"][var]
        assert v["kind"] == "continuous"
        assert v["unit"] == {"age": "years", "height": "cm", "weight": "kg", "bmi": "kg/m2"}[var]
        for s in SPLITS:
            x = values_of(df, SPLIT_OF, s, var)
            got = v["per_split"][s]
            assert got["n"] == len(x)
            # the case without a clinical row is missing too; so is case 6's blank age
            assert got["missing"] == sum(1 for sp in SPLIT_OF.values() if sp == s) - len(x)
            q1, med, q3 = np.percentile(x, [25, 50, 75])
            assert got["median"] == pytest.approx(med) and got["q1"] == pytest.approx(q1)
            assert got["q3"] == pytest.approx(q3)
            assert got["mean"] == pytest.approx(x.mean()) and got["sd"] == pytest.approx(np.std(x, ddof=1))
        ref = values_of(df, SPLIT_OF, "train", var)
        for o in ("validation", "test"):
            assert v["smd"][o] == pytest.approx(cont_smd(ref, values_of(df, SPLIT_OF, o, var)), rel=1e-9)
    assert j["variables"]["age"]["per_split"]["train"]["missing"] == 1
    assert j["variables"]["age"]["per_split"]["test"]["missing"] == 1


def test_categorical_values_match_pandas():
    df = clinical()
    j = build_table1(df, SPLIT_OF, PATIENT_OF, SPLITS).as_json()
    for var in CAT:
        fmt = FMT.get(var, str)
        v = j["variables"][var]
        assert v["kind"] == "categorical"
        every = sorted({fmt(x) for x in df[var].dropna()})
        assert v["levels"] == every
        counts = {}
        for s in SPLITS:
            c = levels_of(df, SPLIT_OF, s, var, fmt)
            counts[s] = c
            got = v["per_split"][s]
            n = sum(c.values())
            assert got["n"] == n
            assert got["missing"] == sum(1 for sp in SPLIT_OF.values() if sp == s) - n
            assert list(got["levels"]) == every
            for level in every:
                assert got["levels"][level]["n"] == c.get(level, 0)
                assert got["levels"][level]["percent"] == pytest.approx(100.0 * c.get(level, 0) / n)
        for o in ("validation", "test"):
            want = cat_smd(counts["train"], counts[o], every)
            assert v["smd"][o] == pytest.approx(want, rel=1e-6, abs=1e-9)
    sex = j["variables"]["sex"]
    # two levels: the SMD is the plain difference of proportions over their pooled SD
    assert sex["smd"]["validation"] == pytest.approx(binary_smd(3 / 6, 1 / 3))
    assert sex["smd"]["test"] == pytest.approx(binary_smd(3 / 6, 1 / 2)) == 0.0
    assert j["variables"]["asa"]["per_split"]["train"]["missing"] == 1  # case 5's blank ASA
    # ASA 4 is in test only and Gynecology / Robotic in train only: levels neither split of a pair has
    # are left out of that pair's SMD (else singular): finite values
    assert all(j["variables"][v]["smd"][o] is not None for v in CAT for o in ("validation", "test"))
    # where TableOne itself gives NaN: ASA 4 is in neither train nor validation
    frame = df.assign(split=[SPLIT_OF[c] for c in df.caseid], asa=[None if pd.isna(a) else str(int(a))
                                                                     for a in df.asa])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = TableOne(frame, columns=["asa"], categorical=["asa"], groupby="split", order={"split": SPLITS},
                     smd=True, overall=False, include_null=False)
    assert math.isnan(float(t.smd_table.loc["asa", "SMD (train,validation)"]))
    assert j["variables"]["asa"]["smd"]["validation"] == pytest.approx(
        cat_smd(counts_asa := levels_of(df, SPLIT_OF, "train", "asa", asa_fmt),
                levels_of(df, SPLIT_OF, "validation", "asa", asa_fmt), ["1", "2", "3", "4"]))
    assert "4" not in counts_asa


def test_smd_is_tableones_own():
    """Where every level is in every split, the SMDs are TableOne(smd=True)'s, in absolute value."""
    rng = np.random.default_rng(7)
    n = 600
    df = pd.DataFrame({"caseid": np.arange(1, n + 1), "age": rng.normal(58, 15, n).round(),
                       "weight": rng.normal(62, 11, n).round(1),
                       "sex": rng.choice(["M", "F"], n), "asa": rng.choice([1, 2, 3], n, p=[.3, .55, .15]),
                       "department": rng.choice(["General surgery", "Thoracic surgery", "Urology"], n)})
    split_of = {int(c): SPLITS[i] for c, i in zip(df.caseid, rng.choice(3, n, p=[.6, .2, .2]))}
    got = build_table1(df, split_of, {}, SPLITS).as_json()["variables"]
    ref = df.assign(split=[split_of[int(c)] for c in df.caseid], asa=df.asa.astype(str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = TableOne(ref, columns=["age", "weight", "sex", "asa", "department"],
                     categorical=["sex", "asa", "department"], continuous=["age", "weight"], groupby="split",
                     order={"split": SPLITS}, smd=True, overall=False)
    for var in ["age", "weight", "sex", "asa", "department"]:
        for o in ("validation", "test"):
            theirs = t.smd_table.loc[var, f"SMD (train,{o})"]
            assert got[var]["smd"][o] == pytest.approx(abs(float(theirs)), rel=1e-9)


def test_folds_reference_is_fold_1():
    folds = ["fold-1", "fold-2", "fold-3"]
    split_of = {c: folds[(c - 1) % 3] for c in range(1, 12)}
    df = clinical()
    t = build_table1(df, split_of, PATIENT_OF, folds)
    j = t.as_json()
    assert j["splits"] == folds and j["reference"] == "fold-1"
    assert j["cases"] == {"fold-1": 4, "fold-2": 4, "fold-3": 3}
    for var in CONT:
        assert set(j["variables"][var]["smd"]) == {"fold-2", "fold-3"}
        for o in ("fold-2", "fold-3"):
            want = cont_smd(values_of(df, split_of, "fold-1", var), values_of(df, split_of, o, var))
            assert j["variables"][var]["smd"][o] == pytest.approx(want)
    c1 = levels_of(df, split_of, "fold-1", "department")
    assert j["variables"]["department"]["smd"]["fold-3"] == pytest.approx(
        cat_smd(c1, levels_of(df, split_of, "fold-3", "department")))
    assert t.header()[-2:] == ["SMD fold-2 vs fold-1", "SMD fold-3 vs fold-1"]


def test_empty_split_and_empty_reference():
    split_of = {c: s for c, s in SPLIT_OF.items() if s != "validation"}
    t = build_table1(clinical(), split_of, PATIENT_OF, SPLITS)
    j = t.as_json()
    assert j["cases"]["validation"] == 0 and j["patients"]["validation"] == 0
    for name, v in j["variables"].items():
        assert v["smd"]["validation"] is None
        assert v["smd"]["test"] is not None
        got = v["per_split"]["validation"]
        assert got["n"] == 0 and got["missing"] == 0
        if v["kind"] == "continuous":
            assert got["median"] is None and got["q1"] is None and got["q3"] is None and got["sd"] is None
        else:
            assert all(x["n"] == 0 and x["percent"] is None for x in got["levels"].values())
    grid = pd.read_csv(io.StringIO(t.csv_text()), index_col=[0, 1], keep_default_na=False, dtype=str)
    assert grid.loc[("cases", ""), "validation"] == "0"
    assert grid.loc[("age (years), median [Q1,Q3]", ""), "validation"] == ""
    assert grid.loc[("sex, n (%)", "F"), "validation"] == ""
    assert grid.loc[("age (years), median [Q1,Q3]", "(missing)"), "validation"] == "0"
    assert "validation" in t.html()

    # the reference split empty: no SMD at all
    split_of = {c: s for c, s in SPLIT_OF.items() if s != "train"}
    j = build_table1(clinical(), split_of, PATIENT_OF, SPLITS).as_json()
    assert all(x is None for v in j["variables"].values() for x in v["smd"].values())
    # no case at all
    j = build_table1(clinical(), {}, {}, SPLITS).as_json()
    assert j["cases"] == {s: 0 for s in SPLITS} and j["variables"] == {}


def test_single_case_split():
    split_of = {**{c: "train" for c in range(1, 11)}, 11: "test"}
    df = clinical()
    j = build_table1(df, split_of, PATIENT_OF, ["train", "test"]).as_json()
    age = j["variables"]["age"]
    one = age["per_split"]["test"]
    assert one == {"n": 1, "missing": 0, "median": 44.0, "q1": 44.0, "q3": 44.0, "mean": 44.0, "sd": 0.0}
    train = values_of(df, split_of, "train", "age")
    assert age["smd"]["test"] == pytest.approx(abs(train.mean() - 44.0) / math.sqrt(np.var(train, ddof=1) / 2))
    assert j["variables"]["sex"]["per_split"]["test"]["levels"]["M"] == {"n": 1, "percent": 100.0}


def test_without_department_columns_and_an_empty_column():
    df = clinical().drop(columns=["department", "ane_type", "approach", "emop"])
    df["bmi"] = ""  # a column entirely blank is left out
    t = build_table1(df, SPLIT_OF, PATIENT_OF, SPLITS)
    assert [v.name for v in t.variables] == ["age", "sex", "height", "weight", "asa"]
    labels = {r[0] for r in t.grid()}
    assert not any(x.startswith(("department", "ane_type", "approach", "emop", "bmi")) for x in labels)
    # only the VitalDB core columns
    t = build_table1(clinical()[["caseid", "age", "sex"]], SPLIT_OF, PATIENT_OF, SPLITS)
    assert [v.name for v in t.variables] == ["age", "sex"]


def test_values_read_as_the_pipeline_reads_them():
    rows = [(1, 430, " m ", 170, 900, 24, 7, "Y", " General surgery "),  # entry errors: missing
            (2, 50, "f", 160, 60, 23.4, "2", "N", "General surgery"),
            (3, "", "x", "", 70, "", 2.0, 1, ""),
            (4, 60, "F", 165, 65, 23.9, 3, 0, "Urology")]
    df = pd.DataFrame(rows, columns=["caseid", "age", "sex", "height", "weight", "bmi", "asa", "emop",
                                     "department"])
    j = build_table1(df, {1: "train", 2: "train", 3: "test", 4: "test"}, {}, ["train", "test"]).as_json()
    v = j["variables"]
    assert v["age"]["per_split"]["train"]["n"] == 1 and v["age"]["per_split"]["train"]["median"] == 50.0
    assert v["weight"]["per_split"]["train"]["n"] == 1  # 900 kg is implausible
    assert v["sex"]["levels"] == ["F", "M"]
    assert v["sex"]["per_split"]["train"]["levels"] == {"F": {"n": 1, "percent": 50.0},
                                                       "M": {"n": 1, "percent": 50.0}}  # " m ", "f"
    assert v["sex"]["per_split"]["test"]["missing"] == 1  # "x": not a sex
    assert v["asa"]["levels"] == ["2", "3"]  # 7 is implausible; "2", 2.0 one level
    assert v["asa"]["per_split"]["train"]["missing"] == 1
    assert v["emop"]["levels"] == ["N", "Y"]
    assert v["emop"]["per_split"]["test"]["levels"] == {"N": {"n": 1, "percent": 50.0},
                                                       "Y": {"n": 1, "percent": 50.0}}
    assert v["department"]["levels"] == ["General surgery", "Urology"]
    assert v["department"]["per_split"]["test"]["missing"] == 1


def test_no_clinical_rows():
    for rows in (None, pd.DataFrame(), pd.DataFrame({"caseid": []})):
        t = build_table1(rows, SPLIT_OF, PATIENT_OF, SPLITS)
        assert t.variables == ()
        assert t.no_clinical_row == t.cases == {"train": 6, "validation": 3, "test": 3}
        assert t.csv_text().splitlines()[3].startswith("cases without a clinical row,,6,3,3")


def test_case_ids_of_any_kind():
    df = clinical().astype({"caseid": str})
    a = build_table1(df, SPLIT_OF, PATIENT_OF, SPLITS).as_json()
    b = build_table1(clinical(), {str(k): v for k, v in SPLIT_OF.items()}, PATIENT_OF, SPLITS).as_json()
    c = build_table1(clinical(), SPLIT_OF, PATIENT_OF, SPLITS).as_json()
    assert a == b == c


def test_csv_text_parses_back():
    t = build_table1(clinical(), SPLIT_OF, PATIENT_OF, SPLITS)
    grid = pd.read_csv(io.StringIO(t.csv_text()), index_col=[0, 1], keep_default_na=False, dtype=str)
    assert list(grid.columns) == SPLITS + ["SMD validation vs train", "SMD test vs train"]
    want = [("cases", ""), ("patients", ""), ("cases without a clinical row", ""),
            ("age (years), median [Q1,Q3]", ""), ("age (years), median [Q1,Q3]", "(missing)"),
            ("sex, n (%)", "F"), ("sex, n (%)", "M"), ("sex, n (%)", "(missing)")]
    assert list(grid.index[:len(want)]) == want
    labels = list(dict.fromkeys(grid.index.get_level_values(0)))
    assert labels == ["cases", "patients", "cases without a clinical row", "age (years), median [Q1,Q3]",
                      "sex, n (%)", "height (cm), median [Q1,Q3]", "weight (kg), median [Q1,Q3]",
                      "bmi (kg/m2), median [Q1,Q3]", "asa, n (%)", "emop, n (%)", "department, n (%)",
                      "ane_type, n (%)", "approach, n (%)"]
    assert list(grid.loc["department, n (%)"].index) == ["General surgery", "Gynecology", "Thoracic surgery",
                                                         "Urology", "(missing)"]
    assert grid.loc[("cases", ""), "train"] == "6" and grid.loc[("patients", ""), "train"] == "5"
    # tableone's own cells
    x = values_of(clinical(), SPLIT_OF, "validation", "age")
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    assert grid.loc[("age (years), median [Q1,Q3]", ""), "validation"] == f"{med:.1f} [{q1:.1f},{q3:.1f}]"
    assert grid.loc[("sex, n (%)", "M"), "train"] == "3 (50.0)"
    assert grid.loc[("asa, n (%)", "(missing)"), "train"] == "1"
    # SMDs on a variable's first row, 3 decimals
    smd = t.as_json()["variables"]["age"]["smd"]["test"]
    assert grid.loc[("age (years), median [Q1,Q3]", ""), "SMD test vs train"] == f"{smd:.3f}"
    assert grid.loc[("sex, n (%)", "M"), "SMD test vs train"] == ""
    assert grid.loc[("sex, n (%)", "F"), "SMD test vs train"] == "<0.001"  # 0: tableone writes <0.001


def test_html_escaped():
    rows = [r[:8] + (("A&E <acute>",) if r[0] in (1, 7) else ("General surgery",)) + r[9:] for r in ROWS]
    h = build_table1(clinical(rows), SPLIT_OF, PATIENT_OF, SPLITS).html()
    assert h.startswith('<table class="table1">') and h.rstrip().endswith("</table>")
    for s in SPLITS:
        assert f"<th>{s}</th>" in h
    assert "A&amp;E &lt;acute&gt;" in h and "<acute>" not in h
    assert "SMD validation vs train" in h
    assert build_table1(clinical(rows), SPLIT_OF, PATIENT_OF, SPLITS).html('x" onload="y').startswith(
        '<table class="x&quot; onload=&quot;y">')


def test_json_is_plain():
    for split_of in (SPLIT_OF, {c: s for c, s in SPLIT_OF.items() if s != "test"}, {1: "test", 2: "validation"}):
        j = build_table1(clinical(), split_of, PATIENT_OF, SPLITS).as_json()
        assert plain(j)
        json.dumps(j, allow_nan=False)


def test_bad_input():
    with pytest.raises(ValueError, match="not one of"):
        build_table1(clinical(), {1: "holdout"}, {}, SPLITS)
    with pytest.raises(ValueError, match="caseid"):
        build_table1(clinical().drop(columns="caseid"), SPLIT_OF, {}, SPLITS)


def test_frozen():
    t = build_table1(clinical(), SPLIT_OF, PATIENT_OF, SPLITS)
    with pytest.raises(AttributeError):
        t.splits = ()
    assert t.reference == "train" and t.variable("age").kind == "continuous"


def test_vitaldb_scale_time():
    """~6,000 cases over 3 splits: well under 2 s (a loose bound here, for a loaded CI machine)."""
    rng = np.random.default_rng(1)
    n = 6000
    df = pd.DataFrame({"caseid": np.arange(1, n + 1), "subjectid": rng.integers(1, 5500, n),
                       "age": rng.normal(58, 15, n).round(), "sex": rng.choice(["M", "F"], n),
                       "height": rng.normal(162, 9, n).round(1), "weight": rng.normal(61, 11, n).round(1),
                       "bmi": rng.normal(23, 3, n).round(1),
                       "asa": rng.choice([1, 2, 3, 4, NAN], n, p=[.28, .58, .11, .01, .02]),
                       "department": rng.choice(["General surgery", "Thoracic surgery", "Gynecology", "Urology"],
                                                n, p=[.77, .17, .04, .02]),
                       "ane_type": rng.choice(["General", "Spinal", "Sedationalgesia"], n, p=[.946, .043, .011]),
                       "emop": rng.choice([0, 1], n, p=[.88, .12]),
                       "approach": rng.choice(["Open", "Videoscopic", "Robotic"], n, p=[.53, .43, .04])})
    split_of = {int(c): SPLITS[i] for c, i in zip(df.caseid, rng.choice(3, n, p=[.7, .15, .15]))}
    patient_of = {int(c): f"s{s}" for c, s in zip(df.caseid, df.subjectid)}
    t0 = time.perf_counter()
    t = build_table1(df, split_of, patient_of, SPLITS)
    t.as_json(), t.csv_text(), t.html()
    elapsed = time.perf_counter() - t0
    print(f"Table 1 of {n} cases over 3 splits: {elapsed:.2f} s")
    assert elapsed < 6.0
    assert sum(t.cases.values()) == n
