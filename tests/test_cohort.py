"""The cohort: criteria refused before any work, cases left out and accounted
for, the least work when the criteria change, track lists from a table or
from each file's track information alone."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import vitaldb
from conftest import CHROMIUM, INMEM, chromium, run_cli, split_bytes

from pipeline.io.sources import Source
from pipeline.io.vital import load_case, read_track_names
from pipeline.output import storage
from transforms import cohort, spec
from transforms.cohort import Criterion, parse_criteria

T0 = 4102444800.0
BASE = ["Solar8000/HR", "Solar8000/NIBP_SBP", "Solar8000/NIBP_DBP", "Solar8000/NIBP_MBP", "Solar8000/PLETH_SPO2"]
ART = ["Solar8000/ART_SBP", "Solar8000/ART_DBP", "Solar8000/ART_MBP"]
PPF = ["Orchestra/PPF20_RATE"]
VALUE = {"HR": 75.0, "SBP": 120.0, "DBP": 70.0, "MBP": 90.0, "SPO2": 98.0, "RATE": 15.0}

# case: (tracks, age, ane_type, department, seconds between NIBP records)
CASES = {
    1: (BASE + ART + PPF, 54, "General", "General surgery", 2),
    2: (BASE + PPF, 61, "General", "Thoracic surgery", 2),
    3: (BASE + ART + PPF, 15, "General", "General surgery", 2),  # under 18
    4: (BASE + ART + PPF, 70, "Spinal", "Urology", 2),  # not general anaesthesia
    5: (BASE + ART, 48, "General", "General surgery", 2),  # no propofol pump
    6: (BASE + ART + PPF, 39, "General", "Gynecology", 2),
    7: (["Solar8000/HR"] + PPF, 66, "General", "General surgery", 2),  # no blood pressure at all
}


def write_case(path: str, tracks: list[str], seconds: int = 1500, every: int = 2) -> None:
    vf = vitaldb.VitalFile()
    vf.dtstart, vf.dtend = T0, T0 + seconds
    for name in tracks:
        value = VALUE[name.rsplit("/", 1)[1].split("_")[-1]]
        vf.add_track(name, [{"dt": T0 + t, "val": value + (t % 7)} for t in range(0, seconds, every)], unit="")
    vf.to_vital(path)


@pytest.fixture(scope="module")
def cohort_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("cohort")
    rows = []
    for cid, (tracks, age, ane, dept, every) in CASES.items():
        write_case(str(folder / f"{cid:04d}.vital"), tracks, every=every)
        rows.append({"caseid": cid, "subjectid": 500 + cid, "age": age, "sex": "F" if cid % 2 else "M",
                     "height": 165.0, "weight": 70.0, "bmi": 25.7, "asa": 2, "ane_type": ane, "department": dept,
                     "opname": "Exploratory laparotomy, adhesiolysis"})
    pd.DataFrame(rows).to_csv(folder / "clinical_data.csv", index=False)
    with open(folder / "trks.csv", "w") as fh:
        fh.write("caseid,tname,tid\n")
        for cid, (tracks, *_) in CASES.items():
            for i, t in enumerate(tracks + (["Solar8000/BT", "Solar8000/BT"] if cid == 1 else [])):
                fh.write(f"{cid},{t},{cid:04d}{i:036d}\n")
    return str(folder)


STUDY = ["--include", "age >= 18", "--include", "ane_type == 'General'", "--require", "Propofol_INF,BP_MAP"]


def run(data: str, out: str, *extra: str) -> int:
    return run_cli("--input", data, "--output", out, INMEM, "--min-success-rate", "0", *extra)


def meta(out: str) -> dict:
    return json.load(open(os.path.join(out, "preprocessing_metadata.json")))


def committed_times(out: str) -> dict:
    return {c: m.committed for c, m in storage.read_done(out).items()}


# ---- criteria checked before any work ----------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--include", "agee >= 18"], ["--include 'agee >= 18'", "no column 'agee'", "closest columns: age"]),
    (["--include", "age >= "], ["--include 'age >= '", "not a valid expression"]),
    (["--exclude", "age + 1"], ["--exclude 'age + 1'", "not a true/false condition"]),
    (["--require", "BP_MEAN"], ["--require 'BP_MEAN'", "unknown feature 'BP_MEAN'", "BP_MAP"]),
    (["--min-measured", "BP_MAP=1.5"], ["--min-measured 'BP_MAP=1.5'", "outside [0, 1]"]),
    (["--min-measured", "BP_MAP"], ["FEATURE=FRACTION"]),
    (["--include", "age >= 200"], ["no case is left after --include 'age >= 200'", "7 requested"]),
])
def test_bad_criteria_are_refused_naming_them_and_nothing_is_written(cohort_data, tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    assert run(cohort_data, str(out), *flags) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_criteria_forms_and_order():
    crit = parse_criteria([{"min_measured": "BP_MAP=0.5"}, {"require": "HR"}, {"include": "age > 1"},
                           ("exclude", "asa >= 4")])
    assert [c.kind for c in cohort.ordered(crit)] == ["include", "exclude", "require", "min_measured"]
    assert parse_criteria(json.dumps(cohort.dump_criteria(crit))) == crit
    assert Criterion("require", " HR , BP_MAP").features == ("HR", "BP_MAP")


# ---- the flow ---------------------------------------------------------------------------

def test_a_study_cohort_is_selected_and_every_case_left_out_is_accounted_for(cohort_data, tmp_path, capsys):
    out = str(tmp_path / "study")
    assert run(cohort_data, out, *STUDY, "--exclude", "department == 'Gynecology'") == 0
    text = capsys.readouterr().out
    m = meta(out)
    assert m["cohort"]["requested"] == 7
    assert m["cohort"]["criteria"] == [
        {"kind": "include", "text": "age >= 18", "excluded": [3]},
        {"kind": "include", "text": "ane_type == 'General'", "excluded": [4]},
        {"kind": "exclude", "text": "department == 'Gynecology'", "excluded": [6]},
        {"kind": "require", "text": "Propofol_INF,BP_MAP", "excluded": [5, 7]}]
    assert m["cohort"]["selected"] == 2
    # Excluded is a status: markers name the criterion; nothing of these cases is in the splits.
    assert storage.read_excluded(out)[5].to_json()["text"] == "Propofol_INF,BP_MAP"
    assert sorted(m["cases"]["ok"]) == [1, 2] and m["cases"]["failed"] == []
    assert sum(d["cases"] for d in m["splits"].values()) == 2
    # The split files are exactly those of a run over the selected cases without criteria.
    ref = str(tmp_path / "ref")
    assert run(cohort_data, ref, "--cases", "1,2") == 0
    assert split_bytes(out) == split_bytes(ref)
    assert "cohort: 7 requested" in text and "left out by --include 'age >= 18': 1 [3]" in text
    assert "2 selected" in text
    import yaml
    cfg = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert cfg["cohort"] == [{"include": "age >= 18"}, {"include": "ane_type == 'General'"},
                             {"exclude": "department == 'Gynecology'"}, {"require": "Propofol_INF,BP_MAP"}]
    # The effective configuration rebuilds the same output, cohort included.
    again = str(tmp_path / "again")
    assert run_cli("--config", os.path.join(out, "config.yaml"), "--output", again, INMEM) == 0
    assert split_bytes(again) == split_bytes(out) and meta(again)["cohort"]["criteria"] == m["cohort"]["criteria"]


def test_min_measured_uses_the_used_seconds_and_records_the_share(cohort_data, tmp_path):
    out = str(tmp_path / "mm")
    # BP_MAP every 2 s is measured in half the seconds; case 7 has no blood pressure.
    assert run(cohort_data, out, "--min-measured", "BP_MAP=0.4") == 0
    row = meta(out)["cohort"]["criteria"][0]
    assert row["excluded"] == [7] and row["measured"] == {"7": 0.0}
    assert storage.read_excluded(out)[7].measured == 0.0
    assert meta(out)["cohort"]["selected"] == 6


def test_changing_the_criteria_does_the_least_work(cohort_data, tmp_path):
    out = str(tmp_path / "change")
    assert run(cohort_data, out, "--min-measured", "BP_MAP=0.4", "--include", "age >= 18") == 0
    first = committed_times(out)
    assert sorted(first) == [1, 2, 4, 5, 6, 7]  # 7 was processed, then left out; 3 never read
    # Looser: 7 back in without being recomputed, 3 newly processed; stricter elsewhere: 4 out.
    assert run(cohort_data, out, "--include", "ane_type == 'General'") == 0
    second = committed_times(out)
    assert {c: second[c] for c in first} == first
    assert 3 in second
    m = meta(out)
    assert m["cohort"]["criteria"] == [{"kind": "include", "text": "ane_type == 'General'", "excluded": [4]}]
    ref = str(tmp_path / "ref")
    assert run(cohort_data, ref, "--cases", "1,2,3,5,6,7") == 0
    assert split_bytes(out) == split_bytes(ref)
    # No criteria at all: every case, none recomputed.
    assert run(cohort_data, out) == 0
    assert meta(out)["cohort"]["selected"] == 7 and storage.marker_ids(out, storage.EXCLUDED) == set()
    full = str(tmp_path / "full")
    assert run(cohort_data, full) == 0
    assert split_bytes(out) == split_bytes(full)


def test_a_track_list_decides_require_before_any_file_is_read(cohort_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in os.listdir(cohort_data):
        data.joinpath(f).write_bytes(open(os.path.join(cohort_data, f), "rb").read())
    data.joinpath("0005.vital").write_bytes(b"not read: the track list leaves case 5 out")
    out = str(tmp_path / "tl")
    assert run(str(data), out, "--require", "Propofol_INF", "--track-list", str(data / "trks.csv")) == 0
    m = meta(out)
    assert m["cohort"]["criteria"][0]["excluded"] == [5]
    assert m["cases"]["failed"] == []  # its broken file was never opened
    assert m["cohort"]["track_list"] == str(data / "trks.csv")


def test_without_a_track_list_each_file_is_held_against_require_by_its_track_information(cohort_data, tmp_path):
    out = str(tmp_path / "files")
    assert run(cohort_data, out, "--require", "Propofol_INF") == 0
    m = meta(out)
    assert m["cohort"]["criteria"][0]["excluded"] == [5]
    assert 5 not in storage.marker_ids(out, storage.DONE)  # its records were never parsed
    assert storage.read_excluded(out)[5].tracks == tuple(t for t in spec.DEFAULT_SPEC.source_tracks
                                                          if t in BASE + ART)
    # A rerun decides from the markers: nothing is read again.
    before = os.path.getmtime(storage.marker_path(out, storage.EXCLUDED, 5))
    assert run(cohort_data, out, "--require", "Propofol_INF") == 0
    assert os.path.getmtime(storage.marker_path(out, storage.EXCLUDED, 5)) == before


def test_the_track_information_is_read_alone(tmp_path, monkeypatch):
    """vitaldb parses the file's track list and stops at its first record:
    a few kB of a 4-hour file, which a full load reads whole."""
    from pipeline.io import sources
    write_case(str(tmp_path / "0001.vital"), CASES[1][0], seconds=4 * 3600)
    size = os.path.getsize(tmp_path / "0001.vital")
    read = []
    original = sources.LocalFile.read
    monkeypatch.setattr(sources.LocalFile, "read", lambda self, n=-1: read.append(original(self, n)) or read[-1])
    source = Source.for_location(str(tmp_path))
    names, _ = read_track_names(source, 1)
    assert sorted(names) == sorted(CASES[1][0])
    assert sum(map(len, read)) < size / 10, (sum(map(len, read)), size)
    read.clear()
    load_case(source, 1)
    assert sum(map(len, read)) == size


def test_a_file_that_is_not_packed_is_read_through_for_its_track_list(tmp_path, monkeypatch):
    """Without the packed flag a device's track information may follow records: nothing is cut short."""
    from pipeline.io import sources
    from pipeline.tools.sample import write_vital
    vf = vitaldb.VitalFile()
    vf.dtstart, vf.dtend = T0, T0 + 600
    for name in BASE:
        vf.add_track(name, [{"dt": T0 + t, "val": 80.0} for t in range(0, 600, 2)], unit="")
    vf.add_track("Orchestra/PPF20_RATE", [{"dt": T0 + t, "val": 15.0} for t in range(300, 600, 2)], unit="")
    write_vital(vf, str(tmp_path / "0001.vital"), "interleaved")
    read = []
    original = sources.LocalFile.read
    monkeypatch.setattr(sources.LocalFile, "read", lambda self, n=-1: read.append(original(self, n)) or read[-1])
    names, _ = read_track_names(Source.for_location(str(tmp_path)), 1)
    assert sorted(names) == sorted(BASE + ["Orchestra/PPF20_RATE"])
    assert sum(map(len, read)) == os.path.getsize(tmp_path / "0001.vital")


def test_two_tids_of_one_track_are_one_track(cohort_data):
    from pipeline.output.cohort import read_track_table
    table = read_track_table(os.path.join(cohort_data, "trks.csv"))
    assert (table[table["caseid"] == 1]["tname"] == "Solar8000/BT").sum() == 2
    assert cohort.cases_with_any(table, frozenset({"Solar8000/BT"})) == {1}


def test_shares_agree_on_the_cohort(cohort_data, tmp_path):
    out = str(tmp_path / "shares")
    assert run(cohort_data, out, *STUDY, "--share", "2/2") == 0
    assert run(cohort_data, out, *STUDY, "--share", "1/2", "--poll-s", "0") == 0
    single = str(tmp_path / "single")
    assert run(cohort_data, single, *STUDY) == 0
    assert split_bytes(out) == split_bytes(single)
    assert meta(out)["cohort"]["criteria"] == meta(single)["cohort"]["criteria"]


def test_the_flow_decides_fast_on_tables_of_the_real_sizes():
    """The pure decisions on 6,388 cases and 486,449 track rows (the benchmark times them)."""
    rng = np.random.default_rng(0)
    n = 6388
    frame = pd.DataFrame({"caseid": np.arange(1, n + 1), "age": rng.uniform(0.3, 94, n),
                          "ane_type": rng.choice(["General", "Spinal", "Sedationalgesia"], n, p=[.946, .043, .011])})
    names = np.array([t for f in spec.DEFAULT_SPEC.timeseries for t in (s.track for s in f.sources)])
    trks = pd.DataFrame({"caseid": rng.integers(1, n + 1, 486449), "tname": rng.choice(names, 486449)})
    crit = cohort.ordered(parse_criteria([{"include": "age >= 18"}, {"include": "ane_type == 'General'"},
                                          {"require": "Propofol_INF,BP_MAP"}]))
    ex = cohort.clinical_exclusions(frame["caseid"], crit, frame)
    assert set(ex) == set(frame.loc[(frame.age < 18) | (frame.ane_type != "General"), "caseid"])
    left = [c for c in frame["caseid"] if c not in ex]
    req = cohort.table_require_exclusions(left, crit, trks, spec.DEFAULT_SPEC)
    ppf = set(trks.loc[trks.tname == "Orchestra/PPF20_RATE", "caseid"])
    bp = set(trks.loc[trks.tname.isin({s.track for s in spec.DEFAULT_SPEC.feature("BP_MAP").sources}), "caseid"])
    assert set(req) == set(left) - (ppf & bp)


def test_verify_and_inspect_know_the_excluded_status(cohort_data, tmp_path, capsys):
    from pipeline.cli import main
    out = str(tmp_path / "v")
    assert run(cohort_data, out, *STUDY) == 0
    capsys.readouterr()
    assert main(["verify", "--output", out]) == 0
    assert "4 cases excluded by the cohort's criteria: none of them in a split" in capsys.readouterr().out
    assert main(["inspect", out, "--examples", "0"]) == 0
    assert ("cohort: 7 requested, 3 selected; excluded: --include 'age >= 18': 1; --include \"ane_type == 'General'\":"
            " 1; --require 'Propofol_INF,BP_MAP': 2") in capsys.readouterr().out
    # A case marked excluded whose examples are still in a split is named.
    split = meta(out)["splits"]
    in_split = next(c for s in split.values() for c in s["case_ids"])
    storage.write_excluded(out, [cohort.Exclusion(in_split, "include", "age >= 99")])
    assert main(["verify", "--output", out]) == 1
    assert f"case {in_split} is excluded by the cohort (--include 'age >= 99')" in capsys.readouterr().out


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_report_draws_the_flow_as_boxes_and_arrows_in_a_real_browser(cohort_data, tmp_path):
    import html
    import re
    out = str(tmp_path / "r")
    assert run(cohort_data, out, *STUDY, "--exclude", "department == 'Gynecology'") == 0
    page = tmp_path / "r" / "report" / "index.html"
    dom = chromium(page, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    # requested, 4 criteria, selected, too short/failed, 3 splits; an arrow into every box but the first,
    # each ending on its box's edge (the page checks that after layout).
    assert 'data-flow-ok="true"' in body and 'data-flow-boxes="10"' in body and 'data-flow-arrows="9"' in body
    texts = html.unescape(re.sub(r"<[^>]+>", " ", re.search(r"<svg id=\"flow\".*?</svg>", dom, re.S).group(0)))
    for words in ("Requested: 7 cases", "Left out: 1 case (6 remain)", "--include age >= 18",
                  "Left out: 2 cases (2 remain)", "--require Propofol_INF,BP_MAP", "Selected and processed: 2 cases",
                  "Too short for a window: 0; failed: 0"):
        assert words in " ".join(texts.split()), words
    assert 'id="table1"' in dom and "median [Q1,Q3]" in dom


def test_with_the_web_api_a_case_left_out_by_its_tracks_costs_no_byte(cohort_data, tmp_path, monkeypatch, capsys):
    """--input vitaldb reads the API's track table once: a case it leaves out is never asked for."""
    from webstandin import StandIn

    from pipeline.io.sources import VITALDB_API_ENV
    with StandIn(cohort_data) as api:
        monkeypatch.setenv(VITALDB_API_ENV, api.url)
        out = str(tmp_path / "web")
        assert run_cli("--input", "vitaldb", "--output", out, INMEM, *STUDY) == 0
        log = list(api.log)
    m = meta(out)
    assert m["cohort"]["track_list"] == f"{api.url}/trks"
    assert m["cohort"]["criteria"][-1] == {"kind": "require", "text": "Propofol_INF,BP_MAP", "excluded": [5, 7]}
    for cid in (3, 4, 5, 7):  # left out by the clinical table or the track table
        assert api.sent_for(cid) == 0 and not [e for e in log if e[1].endswith(f"/{cid}.vital")], cid
    assert api.sent_for(1) > 0 and [e for e in log if e[1] == "/trks"] == [("GET", "/trks", "ok")]
    assert "track list " + f"{api.url}/trks: " in capsys.readouterr().out


def test_finalize_alone_keeps_the_cohort_and_refuses_new_criteria(cohort_data, tmp_path, capsys):
    from pipeline.cli import main
    out = str(tmp_path / "fin")
    assert run(cohort_data, out, *STUDY) == 0
    before = meta(out)["cohort"]["criteria"]
    assert main(["finalize", "--output", out]) == 0
    assert meta(out)["cohort"]["criteria"] == before
    capsys.readouterr()
    assert main(["finalize", "--output", out, "--include", "age >= 50"]) == 2
    assert "finalize takes the cohort the output was made with" in capsys.readouterr().err


def test_a_criterion_given_twice_counts_once(cohort_data, tmp_path):
    out = str(tmp_path / "twice")
    assert run(cohort_data, out, "--include", "age >= 18", "--include", "age >= 18") == 0
    assert meta(out)["cohort"]["criteria"] == [{"kind": "include", "text": "age >= 18", "excluded": [3]}]
    assert meta(out)["cohort"]["selected"] == 6


def test_with_shares_a_marker_of_earlier_criteria_never_counts_as_this_runs(cohort_data, tmp_path):
    """The leader makes every case's markers say the current criteria before it waits."""
    out = str(tmp_path / "stale")
    assert run(cohort_data, out, "--include", "age >= 50") == 0  # 3, 5, 6 left out, never read
    # No criteria now: the leader alone may not finalize on the old exclusions.
    assert run(cohort_data, out, "--share", "1/2", "--leader-wait-s", "0") == 1
    assert {3, 5, 6} - storage.marker_ids(out, storage.EXCLUDED) == {3, 5, 6}
    assert run(cohort_data, out, "--share", "2/2") == 0
    assert run(cohort_data, out, "--share", "1/2", "--poll-s", "0") == 0
    full = str(tmp_path / "full")
    assert run(cohort_data, full) == 0
    assert split_bytes(out) == split_bytes(full) and meta(out)["cohort"]["selected"] == 7


def test_a_case_the_track_list_does_not_list_is_decided_from_its_file(cohort_data, tmp_path):
    table = pd.read_csv(os.path.join(cohort_data, "trks.csv"))
    partial = tmp_path / "trks.csv"
    table[table["caseid"] != 5].to_csv(partial, index=False)
    out = str(tmp_path / "unlisted")
    assert run(cohort_data, out, "--require", "Propofol_INF", "--track-list", str(partial)) == 0
    assert meta(out)["cohort"]["criteria"][0]["excluded"] == [5]
    assert storage.read_excluded(out)[5].tracks is not None  # read from its file, not assumed absent
