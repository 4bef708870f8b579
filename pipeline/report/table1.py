"""Table 1 per split: the clinical characteristics of the output's cases in
each split (train / validation / test, or fold-1..fold-K), and how far each
split is from the first one (standardised mean differences), built with the
`tableone` library.

Pure: no file I/O. `build_table1(rows, split_of, patient_of, split_names)`
returns a `Table1`; `as_json()`, `csv_text()` and `html()` render it.

Decisions (also in `as_json()`):

* Unit: the case (one row per case, as VitalDB studies report cases), so a
  patient with three operations counts three times in each variable; the
  patients are counted on their own row. `as_json()["unit"] == "case"`.
* A case of the output without a clinical row counts in its split's cases
  and patients (its split key; a case without one is its own patient) and
  as missing in every variable; `no_clinical_row` counts them per split.
* Values are read as the pipeline reads them (contract 1.1, transforms.spec):
  a blank, non-numeric or implausible age, height, weight, bmi or asa, and a
  sex other than M/F (any case, spaces ignored), is missing. bmi is the
  recorded one (the pipeline's derived bmi is not used here). asa is
  categorical ("1".."6"); emop 1/0, Y/N, yes/no, true/false -> "Y"/"N".
  department, ane_type and approach are text, stripped; blank is missing.
* A variable whose column is absent, or entirely missing among the output's
  cases, is left out; so are department etc. where the table lacks them.
* Continuous: median [Q1, Q3] (linear-interpolated quartiles, numpy's
  default, as tableone computes them); per split "n" is the number of cases
  with a value, "missing" the others (n + missing = cases).
* Categorical: n (%) per level, the percent among the split's cases with a
  value (missing ones are not a level); levels are those seen in any split.
* SMD of each variable between the first split (the reference) and each
  other split, as an absolute value (balance: 0.1 is the usual threshold):
  continuous |m1 - m2| / sqrt((s1^2 + s2^2) / 2) with sample SDs (ddof=1;
  a split with a single value has SD 0, tableone's convention); categorical
  the multi-level SMD of Yang & Dalton (2012), both computed by tableone's
  own code (tableone.statistics.Statistics, which TableOne(smd=True) uses).
  For a categorical pair, the levels that neither of the two splits has are
  left out (TableOne would give NaN: their covariance is singular; R's
  tableone, with a generalised inverse, gives this same value). None where
  either split has no value, or where it is not finite (e.g. two
  single-case splits with different values).
* An empty split (0 cases) is listed with 0 cases, empty cells and None.
"""
from __future__ import annotations

import csv
import functools
import html as _html
import importlib.metadata
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from transforms import spec

# tableone is imported when a table is built, not with this module: it
# brings scipy.stats and statsmodels (about 1 s of imports).
TABLEONE_VERSION = importlib.metadata.version("tableone")

UNIT = "case"
# (column, unit) of the continuous variables, in table order.
CONTINUOUS: tuple[tuple[str, str], ...] = (("age", "years"), ("height", "cm"), ("weight", "kg"),
                                           ("bmi", "kg/m2"))
# The categorical variables, in table order (department etc. where the table has them).
CATEGORICAL: tuple[str, ...] = ("sex", "asa", "emop", "department", "ane_type", "approach")
# The rows of the table: variables in this order.
ORDER: tuple[str, ...] = ("age", "sex", "height", "weight", "bmi", "asa", "emop", "department", "ane_type",
                          "approach")
MISSING_LEVEL = "(missing)"  # the level label of the missing-count row in csv_text() / html()
SMD_METHOD = ("absolute standardised mean difference vs the reference split, by tableone "
              f"{TABLEONE_VERSION}: continuous |m1-m2|/sqrt((s1^2+s2^2)/2), sample SD (ddof=1); "
              "categorical: multi-level SMD (Yang & Dalton 2012) over the levels either split has")

_CONT_UNITS = dict(CONTINUOUS)
_EMOP = {"1": "Y", "Y": "Y", "YES": "Y", "TRUE": "Y", "0": "N", "N": "N", "NO": "N", "FALSE": "N"}
_GROUP = "_split"  # the groupby column handed to tableone (never a clinical column name)


@functools.lru_cache(maxsize=None)
def _tableone_lib():
    """(tableone.TableOne, a tableone.statistics.Statistics): the class that
    tabulates, and the SMD formulas TableOne(smd=True) uses."""
    from tableone import TableOne
    from tableone.statistics import Statistics
    return TableOne, Statistics()


@dataclass(frozen=True)
class Variable:
    """One variable of the Table 1. `per_split[split]`: continuous {"n",
    "missing", "median", "q1", "q3", "mean", "sd"}; categorical {"n",
    "missing", "levels": {level: {"n", "percent"}}}; numbers or None.
    `smd[other split]`: float or None. `cells[split]`: tableone's formatted
    cells, one per row (continuous: one; categorical: one per level); "" where
    the split has no value. Read-only by convention."""

    name: str
    kind: str  # "continuous" | "categorical"
    label: str  # the row label, as tableone writes it ("age (years), median [Q1,Q3]")
    unit: Optional[str]
    levels: tuple[str, ...]  # categorical: the levels in table order; continuous: ()
    per_split: Mapping[str, Mapping[str, Any]]
    smd: Mapping[str, Optional[float]]
    cells: Mapping[str, tuple[str, ...]] = field(repr=False)


@dataclass(frozen=True)
class Table1:
    """The Table 1 of an output, per split (see the module docstring for what
    is counted how). Build it with `build_table1`."""

    splits: tuple[str, ...]
    cases: Mapping[str, int]
    patients: Mapping[str, int]
    no_clinical_row: Mapping[str, int]
    variables: tuple[Variable, ...]

    @property
    def reference(self) -> Optional[str]:
        """The split the SMDs are taken against: the first (train, or fold-1)."""
        return self.splits[0] if self.splits else None

    @property
    def others(self) -> tuple[str, ...]:
        return self.splits[1:]

    def variable(self, name: str) -> Variable:
        for v in self.variables:
            if v.name == name:
                return v
        raise KeyError(name)

    def as_json(self) -> dict:
        """Numbers, not formatted strings (plain ints and floats; None for a
        missing value). Shape:
        {"unit": "case", "splits": [...], "reference": "train",
         "cases": {split: int}, "patients": {split: int}, "no_clinical_row": {split: int},
         "variables": {name: {"kind": "continuous", "unit": "years", "label": ...,
                              "per_split": {split: {"n", "missing", "median", "q1", "q3", "mean", "sd"}},
                              "smd": {other split: float | None}},
                       name: {"kind": "categorical", "unit": None, "label": ..., "levels": [...],
                              "per_split": {split: {"n", "missing", "levels": {level: {"n", "percent"}}}},
                              "smd": {...}}},
         "smd_method": str, "tableone_version": str}"""
        variables = {}
        for v in self.variables:
            entry: dict = {"kind": v.kind, "unit": v.unit, "label": v.label}
            if v.kind == "categorical":
                entry["levels"] = list(v.levels)
                entry["per_split"] = {s: {"n": d["n"], "missing": d["missing"],
                                          "levels": {lv: dict(x) for lv, x in d["levels"].items()}}
                                      for s, d in v.per_split.items()}
            else:
                entry["per_split"] = {s: dict(d) for s, d in v.per_split.items()}
            entry["smd"] = dict(v.smd)
            variables[v.name] = entry
        return {"unit": UNIT, "splits": list(self.splits), "reference": self.reference,
                "cases": dict(self.cases), "patients": dict(self.patients),
                "no_clinical_row": dict(self.no_clinical_row), "variables": variables,
                "smd_method": SMD_METHOD, "tableone_version": TABLEONE_VERSION}

    def header(self) -> list[str]:
        """The columns of csv_text() / html(): variable, level, each split, then
        "SMD <split> vs <reference>" for each other split."""
        return (["variable", "level"] + list(self.splits)
                + [f"SMD {o} vs {self.reference}" for o in self.others])

    def grid(self) -> list[list[str]]:
        """The table's rows as text, in the usual Table 1 layout (what
        csv_text() writes under header()): cases, patients (and the cases
        without a clinical row, where there are any), then per variable its
        row (continuous) or one row per level (categorical), tableone's cells
        (median [Q1,Q3] / n (%)), the SMDs on its first row, and a
        "(missing)" row of counts."""
        blank_smd = [""] * len(self.others)
        rows = [["cases", ""] + [str(self.cases[s]) for s in self.splits] + blank_smd,
                ["patients", ""] + [str(self.patients[s]) for s in self.splits] + blank_smd]
        if any(self.no_clinical_row.values()):
            rows.append(["cases without a clinical row", ""]
                        + [str(self.no_clinical_row[s]) for s in self.splits] + blank_smd)
        for v in self.variables:
            smd = [_smd_text(v.smd.get(o)) for o in self.others]
            for i, level in enumerate(v.levels or ("",)):
                rows.append([v.label, level] + [v.cells[s][i] for s in self.splits]
                            + (smd if i == 0 else blank_smd))
            rows.append([v.label, MISSING_LEVEL] + [str(v.per_split[s]["missing"]) for s in self.splits]
                        + blank_smd)
        return rows

    def csv_text(self) -> str:
        """The table as CSV (header(), then grid()); every row carries its
        variable label, so `pd.read_csv(..., index_col=[0, 1])` reads it back."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(self.header())
        w.writerows(self.grid())
        return out.getvalue()

    def html(self, css_class: str = "table1") -> str:
        """An HTML <table class="table1"> fragment of the same rows (every text
        escaped); a variable's label on its first row only."""
        e = _html.escape
        head = "".join(f"<th>{e(h)}</th>" for h in self.header())
        body = []
        last = None
        for row in self.grid():
            label, level, cells = row[0], row[1], row[2:]
            shown = "" if label == last and label not in ("cases", "patients") else label
            last = label
            cls = ' class="missing"' if level == MISSING_LEVEL else ""
            body.append(f"<tr{cls}><th scope=\"row\">{e(shown)}</th><td>{e(level)}</td>"
                        + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
        caption = (f"Table 1 by split (one row per {UNIT}); SMD: absolute standardised mean difference "
                   f"vs {self.reference}")
        return (f'<table class="{e(css_class, quote=True)}">\n<caption>{e(caption)}</caption>\n'
                f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>")


def _smd_text(x: Optional[float]) -> str:
    if x is None:
        return ""
    s = f"{x:.3f}"
    return "<0.001" if s == "0.000" else s  # tableone's way of writing a rounded zero


def _num(x) -> Optional[float]:
    """A plain float, or None for NaN / inf / missing."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _case_key(x):
    """A case id as one kind of key: an integral id as int (42, 42.0, "42"), else its text."""
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else (int(x) if float(x).is_integer() else float(x))
    s = str(x).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    return int(f) if f.is_integer() else s


def _category(value, name: str) -> Optional[str]:
    """A categorical cell as its level, or None (missing)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        s = "1" if value else "0"
    elif isinstance(value, (int, np.integer, float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            return None
        s = str(int(f)) if f.is_integer() else str(f)
    else:
        s = str(value).strip()
        if not s:
            return None
        try:
            f = float(s)
            if math.isfinite(f) and f.is_integer():
                s = str(int(f))
        except ValueError:
            pass
    if name == "sex":
        s = s.upper()
        return s if s in spec.SEX_CODES else None
    if name == "emop":
        return _EMOP.get(s.upper(), s)
    if name == "asa":
        lo, hi = spec.STATIC_BY_NAME["asa"].plausible
        try:
            return s if lo <= float(s) <= hi else None
        except ValueError:
            return None
    return s


def _clean(rows: Optional[pd.DataFrame]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The clinical rows as (frame indexed by case key, continuous names,
    categorical names): normalised values, NaN/None for missing; the
    variables the table has a column for."""
    if rows is None or len(rows.columns) == 0:
        return pd.DataFrame(index=pd.Index([], dtype=object)), [], []
    df = rows.rename(columns=lambda c: str(c).strip().lower())
    df = df.loc[:, ~df.columns.duplicated()]
    if "caseid" not in df.columns:
        raise ValueError("the clinical rows have no caseid column")
    keys = [_case_key(x) for x in df["caseid"].tolist()]
    out = pd.DataFrame(index=pd.Index(keys, dtype=object))
    cont = [c for c, _ in CONTINUOUS if c in df.columns]
    cat = [c for c in CATEGORICAL if c in df.columns]
    for c in cont:
        col = df[c]
        if not pd.api.types.is_numeric_dtype(col):
            col = col.astype(object).map(lambda v: v.strip() if isinstance(v, str) else v)
        v = pd.to_numeric(col, errors="coerce").astype(float).to_numpy()
        st = spec.STATIC_BY_NAME.get(c)
        if st is not None and st.plausible is not None:
            lo, hi = st.plausible
            v = np.where((v >= lo) & (v <= hi), v, np.nan)
        out[c] = v
    for c in cat:
        col = df[c].astype(object).to_numpy()
        known = ~pd.isna(col)
        mapping = {u: _category(u, c) for u in pd.unique(col[known])}
        values = np.full(len(col), None, dtype=object)
        values[known] = [mapping[u] for u in col[known]]
        out[c] = values
    out = out[[k is not None for k in out.index]]
    out = out[~out.index.duplicated(keep="first")]  # one row per case: the first
    return out, cont, cat


def _tableone(data: pd.DataFrame, names: list[str], continuous: bool, groups: list[str]):
    """tableone's Table 1 of `names`, grouped by _GROUP in `groups`' order
    (every group has at least one value of some variable: tableone's
    continuous tables drop a group that has none)."""
    TableOne, _ = _tableone_lib()
    rename = {c: f"{c} ({_CONT_UNITS[c]})" for c in names} if continuous else None
    with warnings.catch_warnings():  # tableone's RuntimeWarnings on all-NaN / single-value groups
        warnings.simplefilter("ignore")
        data = data.loc[data[_GROUP].isin(groups), names + [_GROUP]].reset_index(drop=True)
        return TableOne(data, columns=names,
                        categorical=[] if continuous else names, continuous=names if continuous else [],
                        nonnormal=names if continuous else None, groupby=_GROUP, order={_GROUP: list(groups)},
                        overall=False, missing=False, pval=False, smd=False, include_null=False,
                        rename=rename)


def _rows_by_variable(t, names: list[str]) -> dict[str, tuple[str, list[str], pd.DataFrame]]:
    """tableone's tabulation per variable: (its row label, its levels, its rows
    with one column per group). tableone keeps the `columns` order (sort=False)
    after its "n" row."""
    tab = t.tableone.copy()
    tab.columns = [str(c[-1]) if isinstance(c, tuple) else str(c) for c in tab.columns]
    labels = [lab for lab in dict.fromkeys(tab.index.get_level_values(0)) if lab != "n"]
    if len(labels) != len(names) or not all(str(lab).startswith(n) for n, lab in zip(names, labels)):
        raise RuntimeError(f"tableone's rows {labels} do not follow the variables {names}")
    out = {}
    for name, label in zip(names, labels):
        part = tab.loc[label]
        out[name] = (str(label), [str(x) for x in part.index], part)
    return out


def _lookup(describe: pd.DataFrame):
    """get(stat, group, row) of a tableone describe table (columns (stat,
    group)): its value, NaN where tableone left it out."""
    cols = {}
    for key in describe.columns:
        if isinstance(key, tuple) and len(key) == 2:
            cols[(str(key[0]), str(key[1]))] = describe[key].to_dict()

    def get(stat: str, group: str, row):
        return cols.get((stat, group), {}).get(row, np.nan)
    return get


def build_table1(rows: Optional[pd.DataFrame], split_of: Mapping, patient_of: Mapping,
                 split_names: Sequence[str]) -> Table1:
    """The Table 1 of an output's cases per split.

    rows: the clinical rows (VitalDB's columns: caseid, age, sex, height,
      weight, bmi, asa, and where present department, ane_type, emop,
      approach); one per case (a repeated caseid: its first row); rows of
      cases not in split_of are ignored. None or empty: no clinical rows.
    split_of: {case id: split name} of every case with windows in the output.
    patient_of: {case id: split key}; cases sharing a key are one patient (a
      case without one is its own patient).
    split_names: the output's splits in order; the first is the SMDs' reference.

    Raises ValueError for a case whose split is not in split_names, or rows
    without a caseid column. See the module docstring for the rules.
    """
    splits = tuple(str(s) for s in split_names)
    if len(set(splits)) != len(splits):
        raise ValueError(f"split names repeat: {list(splits)}")
    index = {s: i for i, s in enumerate(splits)}
    group = {s: f"g{i}" for i, s in enumerate(splits)}  # tableone's group labels: no reserved word, no comma
    case_split: dict = {}
    for case, s in split_of.items():
        if str(s) not in index:
            raise ValueError(f"case {case!r} is in split {s!r}, not one of {list(splits)}")
        case_split[_case_key(case)] = str(s)
    patient = {_case_key(c): k for c, k in patient_of.items()}

    cases = {s: 0 for s in splits}
    patients: dict[str, set] = {s: set() for s in splits}
    for c, s in case_split.items():
        cases[s] += 1
        key = patient.get(c)
        patients[s].add(key if key is not None else ("case", c))  # no split key: its own patient

    clinical, cont, cat = _clean(rows)
    clinical = clinical[clinical.index.isin(list(case_split))]
    clinical[_GROUP] = [group[case_split[c]] for c in clinical.index]
    with_row = clinical[_GROUP].value_counts().to_dict()
    no_row = {s: cases[s] - int(with_row.get(group[s], 0)) for s in splits}
    cont = [c for c in cont if clinical[c].notna().any()]
    cat = [c for c in cat if clinical[c].notna().any()]

    made: dict[str, Variable] = {}
    if cont:
        made.update(_continuous(clinical, cont, splits, group, cases))
    if cat:
        made.update(_categorical(clinical, cat, splits, group, cases))
    variables = tuple(made[n] for n in ORDER if n in made)
    return Table1(splits, cases, {s: len(p) for s, p in patients.items()}, no_row, variables)


def _present_groups(clinical: pd.DataFrame, names: list[str], splits, group) -> list[str]:
    has = clinical[names].notna().any(axis=1).groupby(clinical[_GROUP]).any()
    return [group[s] for s in splits if bool(has.get(group[s], False))]


def _continuous(clinical, names, splits, group, cases) -> dict[str, Variable]:
    groups = _present_groups(clinical, names, splits, group)
    t = _tableone(clinical, names, True, groups)
    get = _lookup(t.cont_describe[[c for c in t.cont_describe.columns if c[0] != "t1_summary"]])
    tab = _rows_by_variable(t, names)
    ref = splits[0]
    out = {}
    for name in names:
        label, _, part = tab[name]
        per, cells, moments = {}, {}, {}
        for s in splits:
            g = group[s]
            n = int(_num(get("count", g, name)) or 0) if g in groups else 0
            mean, sd = get("mean", g, name), get("std", g, name)
            if n == 1:
                sd = np.float64(0.0)  # tableone's SD of one observation
            moments[s] = (n, np.float64(mean), np.float64(sd))
            per[s] = {"n": n, "missing": cases[s] - n,
                      "median": _num(get("median", g, name)) if n else None,
                      "q1": _num(get("q25", g, name)) if n else None,
                      "q3": _num(get("q75", g, name)) if n else None,
                      "mean": _num(mean) if n else None, "sd": _num(sd) if n else None}
            cells[s] = (str(part[g].iloc[0]) if n else "",)
        smd = {}
        for o in splits[1:]:
            (n1, m1, s1), (n2, m2, s2) = moments[ref], moments[o]
            if not (n1 and n2):
                smd[o] = None
                continue
            with np.errstate(all="ignore"):
                value, _ = _tableone_lib()[1]._cont_smd(mean1=m1, mean2=m2, sd1=s1, sd2=s2, n1=n1, n2=n2,
                                                        unbiased=False)
            smd[o] = None if _num(value) is None else abs(float(value))
        out[name] = Variable(name, "continuous", label, _CONT_UNITS[name], (), per, smd, cells)
    return out


def _categorical(clinical, names, splits, group, cases) -> dict[str, Variable]:
    groups = _present_groups(clinical, names, splits, group)
    t = _tableone(clinical, names, False, groups)
    get = _lookup(t.cat_describe[[c for c in t.cat_describe.columns if c[0] in ("freq", "percent")]])
    tab = _rows_by_variable(t, names)
    ref = splits[0]
    out = {}
    for name in names:
        label, levels, part = tab[name]
        per, cells, freqs = {}, {}, {}
        for s in splits:
            g = group[s]
            f = np.array([_num(get("freq", g, (name, lv))) or 0.0 for lv in levels]) if g in groups \
                else np.zeros(len(levels))
            pct = [_num(get("percent", g, (name, lv))) for lv in levels] if g in groups else [None] * len(levels)
            n = int(f.sum())
            freqs[s] = f
            per[s] = {"n": n, "missing": cases[s] - n,
                      "levels": {lv: {"n": int(f[i]), "percent": pct[i] if n else None}
                                 for i, lv in enumerate(levels)}}
            cells[s] = tuple(str(part[g].iloc[i]) for i in range(len(levels))) if n else ("",) * len(levels)
        smd = {o: _cat_smd(freqs[ref], freqs[o]) for o in splits[1:]}
        out[name] = Variable(name, "categorical", label, None, tuple(levels), per, smd, cells)
    return out


def _cat_smd(f1: np.ndarray, f2: np.ndarray) -> Optional[float]:
    """tableone's multi-level SMD of two splits' level counts, over the levels
    either has (None if either has no value)."""
    n1, n2 = f1.sum(), f2.sum()
    if not (n1 and n2):
        return None
    keep = (f1 + f2) > 0
    if keep.sum() <= 1:
        return 0.0  # both splits have the one same level
    with np.errstate(all="ignore"):
        value, _ = _tableone_lib()[1]._cat_smd(prop1=f1[keep] / n1, prop2=f2[keep] / n2, n1=n1, n2=n2, unbiased=False)
    v = _num(value)
    return None if v is None else abs(v)


__all__ = ["build_table1", "Table1", "Variable", "UNIT", "CONTINUOUS", "CATEGORICAL", "ORDER", "MISSING_LEVEL",
           "SMD_METHOD", "TABLEONE_VERSION"]
