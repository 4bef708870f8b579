"""Splits by patient (contract 1.2): the split key, one patient's cases
together, the fallback to case ids, and verification of patients."""
import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import INMEM, read_examples, run_cli

from pipeline.io.clinical import read_clinical
from pipeline.output import storage
from pipeline.tools import sample
from transforms import spec
from transforms.per_case import process_case
from transforms.settings import Settings
from transforms.windows import assign_split, patient_id, split_bucket, split_key


def bucket(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100


@pytest.mark.parametrize("value,key", [
    ("0042", "s42"), ("42", "s42"), ("42.0", "s42"), (" 42 ", "s42"), (42, "s42"), (42.0, "s42"),
    ("4.2e1", "s42"), ("+7", "s7"), ("12345678901234567890123", "s12345678901234567890123"),
    ("P-17", "sP-17"), ("  P-17 ", "sP-17"), ("42.5", "s42.5"), ("0042a", "s0042a"),
    (None, "22"), (float("nan"), "22"), ("", "22"), ("   ", "22"),
])
def test_split_key_by_hand(value, key):
    assert split_key(22, value) == key


def test_the_contracts_examples():
    # seed 42, subjectid 9001 -> key "s9001"; no subjectid, case 22 -> key "22"
    assert split_key(5, 9001) == "s9001"
    assert split_bucket("s9001", 42) == bucket("42:s9001")
    assert split_bucket(22, 42) == split_bucket("22", 42) == bucket("42:22")
    b = bucket("42:s9001")
    assert assign_split("s9001") == ("train" if b < 70 else "validation" if b < 85 else "test")
    assert patient_id(float("inf")) == "inf" and patient_id(math.nan) is None


def table(tmp_path, rows, name="clinical_data.csv") -> str:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_one_patients_cases_share_a_split_under_every_seed(tmp_path):
    """Three operations of patient 42, its id written three ways, and a case
    with a blank subjectid: across 60 seeds the three always share a split,
    which a split by case id would not give."""
    path = table(tmp_path, [{"caseid": 1, "subjectid": "0042", "age": 50}, {"caseid": 2, "subjectid": "42"},
                            {"caseid": 3, "subjectid": "42.0"}, {"caseid": 4, "subjectid": None}])
    ct = read_clinical(path)
    assert ct.by_patient and ct.row(1)["subjectid"] == "0042"  # as written
    # The table gives each case's key (the one home of it): a blank subjectid or no row, the case id.
    assert [ct.split_key(c) for c in (1, 2, 3, 4, 5)] == ["s42", "s42", "s42", "4", "5"]
    raw = np.full((400, len(spec.DEFAULT_SPEC.source_tracks)), np.nan)
    by_case_differs = 0
    for seed in range(60):
        s = Settings(split_seed=seed)
        facts = {c: process_case(c, raw, ct.row(c), s, split_key=ct.split_key(c)).facts
                 for c in (1, 2, 3, 4)}
        assert {facts[c].split_key for c in (1, 2, 3)} == {"s42"} and facts[4].split_key == "4"
        assert len({facts[c].split for c in (1, 2, 3)}) == 1
        b = bucket(f"{seed}:s42")
        assert facts[1].split == ("train" if b < 70 else "validation" if b < 85 else "test")
        by_case_differs += len({assign_split(c, s.split, seed) for c in (1, 2, 3)}) > 1
    assert by_case_differs > 10  # by case, the patient's operations would often be split up


def test_the_sample_has_patients_with_several_operations():
    ids = sample.sample_case_ids(20)
    subjects = pd.Series([sample.subject_id(c) for c in ids]).value_counts()
    assert subjects.max() == 3 and (subjects == 2).any()
    assert len({sample.sample_split(c) for c in sample.patient_cases(1)}) == 1


@pytest.fixture(scope="module")
def patients_dataset(tmp_path_factory):
    """Cases 1-10 (patients {1,2,3}, {5,6} and singles), case 10's subjectid blank."""
    folder = tmp_path_factory.mktemp("patients")
    sample.write_sample(str(folder), list(range(1, 11)), 900)
    df = pd.read_csv(folder / "clinical_data.csv", dtype={"subjectid": str})
    df.loc[df["caseid"] == 10, "subjectid"] = None
    df.to_csv(folder / "clinical_data.csv", index=False)
    return str(folder)


def test_a_run_splits_by_patient_and_says_so(patients_dataset, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run_cli("--input", patients_dataset, "--output", out, INMEM) == 0
    text = capsys.readouterr().out
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["split"]["by"] == "patient" and meta["split"]["key"] == "subjectid"
    assert meta["split"]["cases_split_by_case_id"] == [10]
    assert meta["clinical_table"]["split_key"] == "subjectid"
    got = {}
    for s in spec.SPLIT_NAMES:
        for e in read_examples(storage.list_files(f"{out}/{s}/*.tfrecord.gz")):
            got.setdefault(int(e["case_id"][0]), set()).add(s)
    assert all(len(v) == 1 for v in got.values())
    split_of = {c: v.pop() for c, v in got.items()}
    assert split_of[1] == split_of[2] == split_of[3] and split_of[5] == split_of[6]
    keys = {c: (f"s{90000 + sample.first_operation(c)}" if c != 10 else "10") for c in range(1, 11)}
    for c in range(1, 11):
        b = bucket(f"42:{keys[c]}")
        assert split_of[c] == ("train" if b < 70 else "validation" if b < 85 else "test"), c
    patients = {s: len({keys[c] for c in range(1, 11) if split_of[c] == s}) for s in spec.SPLIT_NAMES}
    assert {s: meta["splits"][s]["patients"] for s in spec.SPLIT_NAMES} == patients == meta["split"]["patients"]
    assert {s: meta["verification"]["splits"][s]["patients"] for s in spec.SPLIT_NAMES} == patients
    assert "split by patient (subjectid)" in text and "split by case id, their clinical row names no patient" in text
    q = json.load(open(f"{out}/report/quality.json"))
    assert q["split_by"] == "patient (subjectid)" and q["patients_in_two_splits"] == []
    assert {c["case_id"]: c["patient"] for c in q["cases"]}[2] == "s90001"


def test_a_table_without_subjectid_splits_by_case(patients_dataset, tmp_path, capsys):
    df = pd.read_csv(f"{patients_dataset}/clinical_data.csv").drop(columns=["subjectid"])
    clinical = str(tmp_path / "no-subject.csv")
    df.to_csv(clinical, index=False)
    out = str(tmp_path / "o")
    assert run_cli("--input", patients_dataset, "--clinical", clinical, "--output", out, "--cases", "1-4",
                   INMEM) == 0
    text = capsys.readouterr().out
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["split"]["by"] == "case" and meta["split"]["cases_split_by_case_id"] == []
    assert meta["clinical_table"]["split_key"] == "caseid"
    assert "the table has no subjectid column" in text
    for s in spec.SPLIT_NAMES:
        assert meta["splits"][s]["case_ids"] == [c for c in range(1, 5) if assign_split(c) == s]
        assert meta["splits"][s]["patients"] == meta["splits"][s]["cases"]


def test_verification_fails_when_a_patient_is_in_two_splits(patients_dataset, tmp_path, capsys):
    """A leak the case check cannot see: two cases of one patient in two
    splits (here made by editing a marker, as a changed clinical table
    between two runs into one output would)."""
    out = str(tmp_path / "o")
    assert run_cli("--input", patients_dataset, "--output", out, "--cases", "1-10", INMEM) == 0
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    a = meta["splits"]["train"]["case_ids"][0]
    b = next(c for s in ("validation", "test") for c in meta["splits"][s]["case_ids"])
    path = storage.marker_path(out, storage.DONE, b)
    marker = storage.read_json(path)
    marker["split_key"] = storage.read_json(storage.marker_path(out, storage.DONE, a))["split_key"]
    storage.write_json(path, marker)
    capsys.readouterr()
    assert run_cli("verify", "--output", out) == 1
    assert "is in both train" in capsys.readouterr().out


def test_a_table_that_gains_subjectid_moves_committed_cases_with_their_patient(patients_dataset, tmp_path, capsys):
    """An output first made without subjectid, continued with it: the
    committed cases whose key changed are processed again, so no patient
    is left in two splits."""
    df = pd.read_csv(f"{patients_dataset}/clinical_data.csv").drop(columns=["subjectid"])
    bare = str(tmp_path / "bare.csv")
    df.to_csv(bare, index=False)
    out = str(tmp_path / "o")
    assert run_cli("--input", patients_dataset, "--clinical", bare, "--output", out, "--cases", "1-6", INMEM) == 0
    capsys.readouterr()
    assert run_cli("--input", patients_dataset, "--output", out, "--cases", "1-6", INMEM) == 0
    text = capsys.readouterr().out
    assert "6 committed case(s) processed again because their split key changed" in text
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["verification"]["ok"] and meta["split"]["by"] == "patient"
    split_of = {c: s for s in spec.SPLIT_NAMES for c in meta["splits"][s]["case_ids"]}
    assert split_of[1] == split_of[2] == split_of[3] and split_of[5] == split_of[6]
    assert run_cli("--input", patients_dataset, "--output", out, "--cases", "1-6", INMEM) == 0
    assert "6 skipped (already committed)" in capsys.readouterr().out
