"""Clinical tables as hospitals export them: semicolons and decimal commas,
tabs, a Windows code page, a BOM; detected, said, and the same windows as
the comma-separated twin."""
import json
import shutil

import pandas as pd
import pytest
from conftest import INMEM, run_cli, split_bytes

from pipeline.io.clinical import ClinicalTableError, read_clinical, sniff_format
from pipeline.tools import sample


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Generated cases 1-6 with VitalDB's comma table, and the same table as
    European spreadsheet exports write it."""
    folder = tmp_path_factory.mktemp("twins")
    sample.write_sample(str(folder), list(range(1, 7)), 1200, missing_weight=2)
    df = pd.read_csv(folder / "clinical_data.csv")
    df["department"] = "Chirurgie générale"  # a non-ASCII cell, as Excel writes it in cp1252
    df.to_csv(folder / "clinical_data.csv", index=False)
    europe = df.rename(columns={"caseid": "CaseID", "subjectid": "SubjectID", "weight": "Weight"})
    europe.to_csv(folder / "semicolon.csv", sep=";", decimal=",", index=False, encoding="cp1252",
                  lineterminator="\r\n")
    europe.to_csv(folder / "tab.csv", sep="\t", index=False, encoding="utf-8-sig")
    return str(folder)


def test_a_semicolon_table_with_decimal_commas_reads_as_its_comma_twin(twins):
    import re
    lines = open(f"{twins}/semicolon.csv", encoding="cp1252").read().splitlines()
    assert lines[0].startswith("CaseID;SubjectID;") and re.search(r";\d+,\d+;", lines[1])  # "1;90001;...;61,2;F"
    comma, semi, tab = (read_clinical(f"{twins}/{n}") for n in ("clinical_data.csv", "semicolon.csv", "tab.csv"))
    assert semi.rows == comma.rows == tab.rows
    assert semi.rows[1]["height"] == comma.rows[1]["height"] and isinstance(semi.rows[1]["height"], float)
    assert semi.identity.format == {"separator": "semicolon", "decimal": "comma", "encoding": "cp1252"}
    assert tab.identity.format == {"separator": "tab", "decimal": "point", "encoding": "utf-8"}
    assert comma.identity.format == {"separator": "comma", "decimal": "point", "encoding": "utf-8"}
    assert semi.by_patient and semi.rows[2]["subjectid"] == "90001"


def test_decimal_points_in_a_semicolon_table_stay_points():
    fmt, header = sniff_format("caseid;weight;height\n1;70.5;170.2\n2;80;180.1\n", "t.csv")
    assert (fmt.separator, fmt.decimal) == (";", ".") and header == ["caseid", "weight", "height"]
    fmt, _ = sniff_format("caseid;weight\n1;70,5\n2;80,25\n3;81.5\n", "t.csv")
    assert fmt.decimal == ","  # the majority


def test_an_unreadable_table_is_refused_naming_what_was_tried(tmp_path, twins, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("id|age\n1|3\n")
    with pytest.raises(ClinicalTableError) as e:
        read_clinical(str(bad))
    msg = str(e.value)
    assert "no 'caseid' column" in msg
    for tried in ("as comma-separated: ['id|age']", "as semicolon-separated", "as tab-separated"):
        assert tried in msg
    assert run_cli("--input", twins, "--clinical", str(bad), "--output", str(tmp_path / "o"), "--cases", "1",
                   INMEM) == 2
    assert "as semicolon-separated" in capsys.readouterr().err


def test_the_same_windows_as_the_comma_twin(twins, tmp_path, capsys):
    ref = str(tmp_path / "comma")
    assert run_cli("--input", twins, "--output", ref, INMEM) == 0
    capsys.readouterr()
    out = str(tmp_path / "semicolon")
    assert run_cli("--input", twins, "--clinical", f"{twins}/semicolon.csv", "--output", out, INMEM) == 0
    text = capsys.readouterr().out
    assert "semicolon-separated, decimal commas, cp1252" in text
    assert split_bytes(out) == split_bytes(ref) != {}
    a, b = (json.load(open(f"{o}/preprocessing_metadata.json")) for o in (ref, out))
    assert a["cases"] == b["cases"] and a["splits"] == b["splits"]
    assert b["clinical_table"]["format"]["decimal"] == "comma"
    assert b["cases"]["dose_weight_default"] == [2]


def test_a_gzip_table_is_read(twins, tmp_path):
    import gzip
    shutil.copy(f"{twins}/clinical_data.csv", tmp_path / "c.csv")
    data = open(tmp_path / "c.csv", "rb").read()
    (tmp_path / "cases").write_bytes(gzip.compress(data))  # no .gz name: found by its magic bytes
    assert read_clinical(str(tmp_path / "cases")).rows == read_clinical(str(tmp_path / "c.csv")).rows
