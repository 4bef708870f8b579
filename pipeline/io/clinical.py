"""The clinical table, as VitalDB or a hospital writes it: read once (any
location), its format sniffed (separator, decimal mark, encoding), one row
per case, duplicates named; every column kept for the cohort's criteria and
Table 1."""
from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.io import sources
from pipeline.io.identity import TableIdentity
from transforms import spec, windows

# The columns the pipeline reads: the case, its patient (the split key, contract
# 1.2), the static features' columns (spec.STATIC) and the anaesthesia period.
CLINICAL_COLUMNS = ("caseid", "subjectid") + tuple(s.column for s in spec.STATIC) + ("anestart", "aneend", "caseend")
SEPARATORS = ((",", "comma"), (";", "semicolon"), ("\t", "tab"))
_COMMA_DECIMAL = re.compile(r"^\s*[+-]?\d+,\d+\s*$")
_POINT_DECIMAL = re.compile(r"^\s*[+-]?\d*\.\d+\s*$")
# How tables are encoded where they come from: UTF-8 (a BOM is dropped), else
# the Windows code page Excel writes in Western Europe, else Latin-1 (any bytes).
ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


class ClinicalTableError(ValueError):
    pass


@dataclass(frozen=True)
class TableFormat:
    """How a clinical table was written: separator, decimal mark, encoding."""

    separator: str = ","
    decimal: str = "."
    encoding: str = "utf-8"

    def as_json(self) -> dict:
        return {"separator": dict(SEPARATORS)[self.separator], "decimal": "comma" if self.decimal == "," else "point",
                "encoding": self.encoding}

    def describe(self) -> str:
        return (f"{dict(SEPARATORS)[self.separator]}-separated, decimal "
                f"{'commas' if self.decimal == ',' else 'points'}, {self.encoding}")

    @staticmethod
    def from_json(d: dict) -> "TableFormat":
        sep = {name: sep for sep, name in SEPARATORS}[d["separator"]]
        return TableFormat(sep, "," if d["decimal"] == "comma" else ".", d["encoding"])


@dataclass(frozen=True)
class ClinicalTable:
    """The clinical table as the pipeline uses it: one row per case (plain
    Python values, NaN -> None; `subjectid` as written), the cases that
    cannot be trusted because the table holds two or more different rows for
    them, and whether it names patients (a `subjectid` column: the split is
    by patient, else by case)."""

    path: str
    rows: dict  # case id -> {column: value}
    duplicates: dict = field(default_factory=dict)  # case id -> detail naming the rows
    identity: Optional[TableIdentity] = None  # of the table as read
    # Every column as read (one row per trusted case): the cohort's criteria and
    # Table 1 use it; the stages get the table without it (`without_frame`).
    frame: Optional[pd.DataFrame] = field(default=None, compare=False, repr=False)

    def row(self, case_id: int) -> Optional[dict]:
        return self.rows.get(case_id)

    def split_key(self, case_id: int) -> str:
        """The key the case's split is hashed from (contract 1.2,
        transforms.windows.split_key): its row's patient, else the case id.
        The one place a case's key comes from: the transform is given it, and
        a committed case whose key changed since is processed again."""
        return windows.split_key(case_id, (self.row(case_id) or {}).get("subjectid"))

    @property
    def case_ids(self) -> list[int]:
        """Every case the table has a row for (duplicates included)."""
        return sorted(set(self.rows) | set(self.duplicates))

    @property
    def by_patient(self) -> bool:
        return self.identity is not None and self.identity.by_patient

    @property
    def columns(self) -> list[str]:
        return [] if self.frame is None else [str(c) for c in self.frame.columns]

    def without_frame(self) -> "ClinicalTable":
        return dataclasses.replace(self, frame=None)


def _plain(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def _duplicate_detail(path: str, rows: pd.DataFrame) -> str:
    """Names the differing rows (1-based data rows; the header is line 1) and
    the columns in which they differ."""
    differ = [c for c in rows.columns if rows[c].astype(str).nunique(dropna=False) > 1]
    shown = "; ".join(f"{c}: " + " vs ".join(repr(_plain(v)) for v in rows[c]) for c in differ[:6])
    nums = ", ".join(str(int(i) + 1) for i in rows.index)
    return (f"{len(rows)} different rows in {path.rsplit('/', 1)[-1]} (data rows {nums}, file lines "
            f"{', '.join(str(int(i) + 2) for i in rows.index)}) differ in {shown}")


def _decode(data: bytes) -> tuple[str, str]:
    if data[:2] == b"\x1f\x8b":  # a gzip file (cases.csv.gz, or a body sent without its Content-Encoding)
        data = gzip.decompress(data)
    for enc in ENCODINGS:
        try:
            return data.decode(enc), ("utf-8" if enc == "utf-8-sig" else enc)
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def _column_name(raw: str) -> str:
    """A header cell as the pipeline names columns: stripped, and one of its
    own column names in any letter case ("CaseID" is caseid)."""
    name = raw.strip()
    return name.lower() if name.lower() in CLINICAL_COLUMNS else name


def sniff_format(text: str, path: str) -> tuple[TableFormat, list[str]]:
    """The separator (the one under which the header has a caseid column;
    comma, semicolon or tab) and, for semicolons and tabs, the decimal mark
    (commas where more cells are written 51,3 than 51.3); the raw header."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    tried, found = [], []
    for sep, name in SEPARATORS:
        header = next(csv.reader([first], delimiter=sep), [])
        if "caseid" in [_column_name(h) for h in header]:
            found.append((len(header), sep, header))
        tried.append(f"as {name}-separated: {[h.strip() for h in header][:8]}")
    if not found:
        raise ClinicalTableError(f"clinical table {path} has no 'caseid' column; its header read "
                                 + "; ".join(tried))
    _, sep, header = max(found, key=lambda f: f[0])  # the most columns wins (a lone caseid splits any way)
    decimal = "."
    if sep != ",":
        cells = [c for row in csv.reader(io.StringIO(text), delimiter=sep) for c in row[:len(header)]]
        commas = sum(1 for c in cells if _COMMA_DECIMAL.match(c))
        points = sum(1 for c in cells if _POINT_DECIMAL.match(c))
        decimal = "," if commas > points else "."
    return TableFormat(sep, decimal), header


def read_clinical(path: str, case_ids: Optional[list[int]] = None, web=None) -> ClinicalTable:
    """Reads a clinical table once: VitalDB's (a CSV; its web API sends it
    gzip-encoded), or a hospital's export (semicolons and decimal commas,
    tabs, a Windows code page: detected, see sniff_format and TableFormat).

    Identical duplicate rows count as one row; a case with two or more
    different rows is listed in `duplicates` (it fails as
    duplicate_clinical_row). Raises ClinicalTableError with a clear message
    for an unreadable or malformed table.
    """
    try:
        data = sources.read_document(path, web)
    except Exception as e:  # any filesystem's "cannot open" (IOError, BeamIOError, botocore, HTTP...)
        raise ClinicalTableError(f"cannot read clinical table {path}: {e}") from None
    try:
        text, encoding = _decode(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ClinicalTableError(f"clinical table {path} is a damaged gzip file: {e}") from None
    fmt, header = sniff_format(text, path)
    fmt = TableFormat(fmt.separator, fmt.decimal, encoding)
    # subjectid as written (its key keeps "P-17" and reads "0042" as 42, contract 1.2)
    raw_subject = [h for h in header if _column_name(h) == "subjectid"]
    try:
        df = pd.read_csv(io.StringIO(text), sep=fmt.separator, decimal=fmt.decimal,
                         dtype={h: str for h in raw_subject})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise ClinicalTableError(f"clinical table {path} is not a readable table: read as {fmt.describe()} "
                                 f"(the separator under which its header has a caseid column; tried "
                                 f"{', '.join(n for _, n in SEPARATORS)}): {e}") from None
    df.columns = [_column_name(str(c)) for c in df.columns]
    if fmt.decimal == "," and "subjectid" in df.columns:  # "42,0" is the integral id 42 of such a table
        df["subjectid"] = df["subjectid"].where(~df["subjectid"].str.match(r"^\s*[+-]?\d+,\d+\s*$", na=False),
                                                df["subjectid"].str.replace(",", ".", regex=False))
    ids = pd.to_numeric(df["caseid"], errors="coerce")
    if ids.isna().any():
        bad = df.loc[ids.isna(), "caseid"].head(3).tolist()
        raise ClinicalTableError(f"clinical table {path}: non-numeric caseid values {bad}")
    df = df.assign(caseid=ids.astype(np.int64))
    if case_ids is not None:
        df = df[df["caseid"].isin(set(case_ids))]
    df = df.drop_duplicates()  # identical rows are one row
    counts = df["caseid"].value_counts()
    duplicates = {int(c): _duplicate_detail(path, df[df["caseid"] == c]) for c in sorted(counts[counts > 1].index)}
    cols = [c for c in CLINICAL_COLUMNS if c in df.columns]
    trusted = df[~df["caseid"].isin(set(duplicates))].reset_index(drop=True)
    rows: dict[int, dict] = {}
    for rec in trusted[cols].to_dict("records"):
        rows[int(rec["caseid"])] = {k: _plain(v) for k, v in rec.items()}
    return ClinicalTable(path, rows, duplicates,
                         TableIdentity(path, len(data), hashlib.sha256(data).hexdigest(), fmt.as_json(),
                                       "subjectid" if "subjectid" in df.columns else "caseid"),
                         frame=trusted)
