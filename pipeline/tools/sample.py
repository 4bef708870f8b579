"""Generates VitalDB-format sample cases with the `vitaldb` library.

    master-poc-generate --output data/sample --cases 20 [--hours 4 --waveforms] [--layout interleaved] [--seed 1]

Realistic, not noise. Which tracks a case's file holds follows VitalDB's
share of cases per track (its API's track table: noradrenaline in 1.4 % of
cases, propofol 55 %, an arterial line 58 %, BIS 92 %, the ventilator's
settings as well as its measurements); the clinical table has VitalDB's
columns, vocabularies and proportions (departments, operations, diagnoses
with commas, general / spinal / sedation, children, a blank ASA now and
then). Device intervals as in VitalDB (Solar 8000 every 2 s, Primus every
7 s, BIS and Orchestra every 1 s, NIBP every 5 min), an anaesthesia period
with induction, infusions (propofol, remifentanil 20 or 50 ug/mL,
noradrenaline with pauses), ventilation at its settings and sevoflurane,
artifacts. Deliberate situations on request: a too-short case, a case with
no clinical row, patients with two and three operations under one
subjectid, a missing ASA, a missing weight, a weight entered as 900 kg.
Beside clinical_data.csv, trks.csv lists every file's tracks as VitalDB's
`<api>/trks` does (caseid, tname, tid; one track name twice in one case).
Files are packed as VitalDB 1.0.1 serves them, or unpacked, or interleaved
as Vital Recorder writes them (--layout). The embedded sample's case ids are
chosen so that train, validation and test all get patients. One random
stream per case, seeded by (seed, case id): same seed, case id and options
-> same file, on every host.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pandas as pd
import vitaldb

from pipeline.io.sources import CLINICAL_FILE
from pipeline.output import storage
from transforms.settings import Settings
from transforms.windows import split_key

DT0 = 4102444800.0  # 2100-01-01, like VitalDB's anonymised start times
IMPLAUSIBLE_WEIGHT_KG = 900.0
SEED = 2022  # the default seed (the dataset's paper year): the embedded sample
TRKS_FILE = "trks.csv"  # beside the clinical table, as VitalDB's <api>/trks
TRKS_COLUMNS = ("caseid", "tname", "tid")
# VitalDB lists this track twice in 18 of its 5,917 cases (two tids); every
# written sample has one such case (the first that has the track).
TRACKED_TWICE = "Solar8000/BT"

# ---- which tracks a case has -------------------------------------------------------------

VITALDB_CASES = 6388
# VitalDB's cases per track (<api>/trks), as rules drawn in order: the tracks
# of a rule come together (one module, one packet), `given` is a condition on
# the earlier draws ("X": the case has X, "-X": it lacks X) and the rule's
# probability is its cases / the cases meeting the condition, so that every
# track's share of cases is VitalDB's and the tracks that go together in
# VitalDB go together here (propofol by pump nearly always with remifentanil,
# sevoflurane less often with propofol). "Primus" (no slash) is the device.
INVENTORY: tuple[tuple[tuple[str, ...], int, Optional[str]], ...] = (
    (("Solar8000/HR",), 6387, None),
    (("Solar8000/PLETH_SPO2",), 6386, None),
    (("Solar8000/NIBP_MBP",), 5763, None),
    (("Solar8000/NIBP_SBP", "Solar8000/NIBP_DBP"), 5751, "Solar8000/NIBP_MBP"),
    (("Solar8000/ART_SBP", "Solar8000/ART_DBP", "Solar8000/ART_MBP"), 3725, None),  # an arterial line
    (("EV1000/ART_MBP",), 592, None),
    (("Solar8000/BT",), 5917, None),
    (("Solar8000/ETCO2",), 6242, None),  # the monitor's gas module
    (("Solar8000/FIO2",), 6239, "Solar8000/ETCO2"),
    (("Solar8000/RR_CO2",), 6177, "Solar8000/ETCO2"),
    (("Solar8000/RR",), 1294, None),  # from the ECG
    (("Solar8000/VENT_TV",), 5980, None),  # the ventilator through the monitor
    (("Solar8000/VENT_MEAS_PEEP",), 98, "Solar8000/VENT_TV"),
    (("Solar8000/VENT_SET_TV",), 4253, "Solar8000/VENT_TV"),
    (("Solar8000/VENT_SET_FIO2",), 2212, "Solar8000/VENT_TV"),
    (("Solar8000/VENT_SET_PCP",), 2745, "Solar8000/VENT_TV"),  # pressure-controlled ventilation
    (("BIS/BIS",), 5867, None),
    (("Orchestra/PPF20_RATE",), 3512, None),
    (("Orchestra/RFTN20_RATE",), 3456, "Orchestra/PPF20_RATE"),
    (("Orchestra/RFTN20_RATE",), 1317, "-Orchestra/PPF20_RATE"),
    (("Orchestra/RFTN50_RATE",), 68, "-Orchestra/RFTN20_RATE"),
    (("Orchestra/NEPI_RATE",), 88, None),
    (("Primus",), 6362, None),
    (("Primus/ETCO2",), 6339, "Primus"),
    (("Primus/FIO2",), 6335, "Primus"),
    (("Primus/RR_CO2",), 6328, "Primus"),
    (("Primus/SET_FIO2",), 6047, "Primus"),  # a ventilator's settings and what it measures
    (("Primus/TV",), 6018, "Primus/SET_FIO2"),
    (("Primus/PEEP_MBAR",), 5999, "Primus/SET_FIO2"),
    (("Primus/SET_INTER_PEEP", "Primus/SET_RR_IPPV"), 5980, "Primus/SET_FIO2"),
    (("Primus/SET_TV_L",), 5964, "Primus/SET_FIO2"),
    (("Primus/EXP_SEVO", "Primus/INSP_SEVO"), 1526, "Orchestra/PPF20_RATE"),
    (("Primus/EXP_SEVO", "Primus/INSP_SEVO"), 2161, "-Orchestra/PPF20_RATE"),
)


def _rule_probabilities(rules=INVENTORY, total: int = VITALDB_CASES) -> tuple[float, ...]:
    """Each rule's probability given its condition (cases / cases meeting it)."""
    cases: Counter = Counter()
    for tracks, n, _ in rules:
        cases.update({t: n for t in tracks})
    base = {None: total, **{t: n for t, n in cases.items()}, **{f"-{t}": total - n for t, n in cases.items()}}
    return tuple(n / base[given] for _, n, given in rules)


_RULE_P = _rule_probabilities()
TRACK_ORDER = tuple(dict.fromkeys(t for tracks, _, _ in INVENTORY for t in tracks if "/" in t))


def case_rng(case_id: int, seed: int = SEED) -> np.random.Generator:
    """The one random stream of a case: its tracks, clinical row and signals."""
    return np.random.default_rng([seed, case_id])


def draw_tracks(rng: np.random.Generator) -> tuple[str, ...]:
    """A case's track inventory (full names, in TRACK_ORDER), drawn by the
    INVENTORY rules; always len(INVENTORY) draws, whatever comes out."""
    u = rng.random(len(INVENTORY))
    have: set[str] = set()
    for (tracks, _, given), p, x in zip(INVENTORY, _RULE_P, u):
        holds = given is None or (given[1:] not in have if given.startswith("-") else given in have)
        if holds and x < p:
            have.update(tracks)
    return tuple(t for t in TRACK_ORDER if t in have)


def case_tracks(case_id: int, seed: int = SEED) -> tuple[str, ...]:
    """The tracks generate_case draws for a case (before a short recording
    leaves some of them without records, or `rename` renames them)."""
    return draw_tracks(case_rng(case_id, seed))


# ---- patients ----------------------------------------------------------------------------

# Patients with several operations (VitalDB: 6,388 cases of 6,090 patients), more
# often here so that every sample has some: in each run of ten case ids, the 1st,
# 2nd and 3rd are one patient's three operations and the 5th and 6th another's two.
_FIRST_OPERATION = {0: 0, 1: 1, 2: 2, 3: 0, 4: 0, 5: 1, 6: 0, 7: 0, 8: 0, 9: 0}  # (id - 1) % 10 -> back to the 1st
SUBJECT_BASE = 90000  # subject ids are not case ids (a mix-up would show)


def first_operation(case_id: int) -> int:
    """The case id of the patient's first operation (the patient's own id)."""
    return case_id - _FIRST_OPERATION[(case_id - 1) % 10]


def subject_id(case_id: int) -> int:
    """The generated clinical table's `subjectid` of a case: its patient."""
    return SUBJECT_BASE + first_operation(case_id)


def patient_cases(case_id: int) -> list[int]:
    """Every case id of the patient a case belongs to."""
    first = first_operation(case_id)
    return [c for c in range(first, first + 3) if first_operation(c) == first]


def sample_split(case_id: int, settings: Optional[Settings] = None) -> str:
    """The split a generated case lands in (by its patient, contract 1.2): the
    key its row's subjectid gives (as ClinicalTable.split_key reads the written
    table) under the run's settings (Settings.split_of, as process_case). It is
    known before the table is written: the sample's case ids are chosen by it."""
    return (settings or Settings()).split_of(split_key(case_id, subject_id(case_id)))


# VitalDB's cases.csv: ages (lo, hi, cases; 57 patients under 18), sexes, and
# adults' height (cm) and BMI (kg/m2) by sex as (mean, sd).
AGE_BINS = ((0.3, 18, 57), (18, 30, 262), (30, 40, 500), (40, 50, 914), (50, 60, 1575), (60, 70, 1697),
            (70, 80, 1129), (80, 95, 254))
SEXES = {"M": 3243, "F": 3145}
ADULT_HEIGHT = {"M": (168.3, 6.5), "F": (156.5, 6.1)}
ADULT_BMI = {"M": (23.3, 3.3), "F": (23.4, 3.8)}
CHILD_BMI = (16.0, 0.2, 2.5)  # mean at birth, its rise per year of age, sd (under 18: 18.9 +- 4.6)


@dataclass(frozen=True)
class Patient:
    """A patient at the first operation; later operations keep the height."""

    sex: str
    age: float
    height: float
    weight: float


def _pick(rng: np.random.Generator, counts: dict):
    """A key of {key: count}, drawn in proportion to the counts (one draw)."""
    keys = list(counts)
    cum = np.cumsum([counts[k] for k in keys], dtype=float)
    return keys[int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))]


def draw_patient(first_case: int, seed: int = SEED) -> Patient:
    """A patient's body, from the patient's own stream (seeded by the first
    operation's case id), so all the patient's operations agree on it."""
    rng = np.random.default_rng([seed, first_case, 1])
    sex = _pick(rng, SEXES)
    lo, hi, _ = AGE_BINS[_pick(rng, {i: n for i, (_, _, n) in enumerate(AGE_BINS)})]
    age = float(rng.uniform(lo, hi))
    age = round(age, 1) if age < 1 else float(int(age))
    mean, sd = ADULT_HEIGHT[sex]
    grown = 50 + 25 * min(age, 1) + 6 * max(age - 1, 0)  # children grow into adult height
    height = min(mean, grown) + rng.normal(0, sd if grown >= mean else 0.04 * grown)
    bmi = rng.normal(*ADULT_BMI[sex]) if age >= 18 else rng.normal(CHILD_BMI[0] + CHILD_BMI[1] * age, CHILD_BMI[2])
    weight = float(np.clip(bmi * (height / 100) ** 2, 3.0, 150.0))
    return Patient(sex, age, round(float(height), 1), round(weight, 1))


# ---- the clinical row --------------------------------------------------------------------

# VitalDB's cases.csv, as counts: anaesthesia by whether a pump (propofol or
# remifentanil) runs, department by anaesthesia and sex, emergency operations
# per department, ASA (None: blank), and each (anaesthesia, department)'s most
# frequent operations: (optype, opname, cases (F, M), {approach: cases},
# {dx: cases}); diagnoses as VitalDB writes them, some with commas.
ANE_TYPES = {True: {"General": 4757, "Sedationalgesia": 70, "Spinal": 17},
             False: {"General": 1286, "Sedationalgesia": 2, "Spinal": 256}}
DEPARTMENTS = {
    ("General", "F"): {"General surgery": 2314, "Gynecology": 203, "Thoracic surgery": 479, "Urology": 16},
    ("General", "M"): {"General surgery": 2316, "Thoracic surgery": 614, "Urology": 101},
    ("Sedationalgesia", "F"): {"General surgery": 25, "Thoracic surgery": 14},
    ("Sedationalgesia", "M"): {"General surgery": 29, "Thoracic surgery": 4},
    ("Spinal", "F"): {"General surgery": 67, "Gynecology": 27},
    ("Spinal", "M"): {"General surgery": 179},
}
EMERGENCY = {"General surgery": (654, 4930), "Gynecology": (32, 230), "Thoracic surgery": (95, 1111),
             "Urology": (1, 117)}
ASA = {1: 1792, 2: 3699, 3: 703, 4: 48, 6: 13, None: 133}
PROCEDURES = {
    ("General", "General surgery"): (
        ("Biliary/Pancreas", "Cholecystectomy", (264, 239), {"Videoscopic": 456, "Robotic": 41, "Open": 6},
         {"Gallbladder stone without obstruction": 129, "Gallbladder polyp": 84}),
        ("Stomach", "Distal gastrectomy", (136, 206), {"Videoscopic": 325, "Robotic": 17},
         {"Early gastric cancer": 240, "Advanced gastric cancer": 60}),
        ("Breast", "Breast-conserving surgery", (294, 1), {"Open": 295},
         {"Infiltrating ductal carcinoma of breast right": 63, "Breast cancer right": 51}),
        ("Colorectal", "Anterior resection", (107, 140), {"Videoscopic": 124, "Open": 123},
         {"Colon cancer, sigmoid": 142, "Colon cancer, rectosigmoid": 38}),
        ("Others", "Exploratory laparotomy", (81, 122), {"Open": 203},
         {"Colon cancer, sigmoid": 9, "Adhesive ileus": 9}),
        ("Colorectal", "Hemicolectomy", (95, 98), {"Open": 104, "Videoscopic": 89},
         {"Colon cancer, ascending": 74, "Colon cancer": 30}),
        ("Colorectal", "Low anterior resection", (71, 110), {"Open": 109, "Videoscopic": 69, "Robotic": 3},
         {"Rectal cancer": 107, "Colon cancer, rectosigmoid": 30}),
        ("Transplantation", "Kidney transplantation", (56, 72), {"Open": 128},
         {"End stage renal disease": 93, "Chronic kidney disease": 16}),
        ("Biliary/Pancreas", "Pylorus preserving pancreaticoduodenectomy", (58, 65), {"Open": 110, "Robotic": 13},
         {"Pancreatic cancer": 29, "Common bile duct cancer": 13}),
        ("Thyroid", "Thyroid lobectomy", (84, 31), {"Open": 99, "Robotic": 12, "Videoscopic": 4},
         {"Thyroid nodule": 101, "Papillary thyroid carcinoma": 8}),
    ),
    ("General", "Thoracic surgery"): (
        ("Major resection", "Lung lobectomy", (144, 188), {"Videoscopic": 306, "Open": 25, "Robotic": 1},
         {"Lung cancer right": 134, "Lung cancer left": 81}),
        ("Minor resection", "Lung wedge resection", (122, 109), {"Videoscopic": 229, "Open": 2},
         {"Solitary pulmonary nodule": 57, "Abnormal chest CT, lung nodule": 43}),
        ("Minor resection", "Metastasectomy", (51, 51), {"Videoscopic": 95, "Open": 7},
         {"Abnormal chest CT, lung nodule": 9, "Metastatic cancer to the lung unspecified side": 8}),
        ("Others", "Excision", (32, 40), {"Videoscopic": 38, "Open": 34},
         {"Mediastinal mass": 20, "Neurogenic tumor": 13}),
        ("Minor resection", "Lung sgmentectomy", (30, 31), {"Videoscopic": 61},  # sic, as in VitalDB
         {"Abnormal chest CT, lung nodule": 13, "Lung cancer left": 9}),
    ),
    ("General", "Gynecology"): (
        ("Major resection", "Radical hysterectomy", (40, 0), {"Videoscopic": 37, "Robotic": 2, "Open": 1},
         {"Myoma uteri": 11, "Endometrial cancer unknown stage": 7}),
        ("Minor resection", "Salpingo-oophorectomy", (27, 0), {"Videoscopic": 27},
         {"Ovarian cyst": 14, "Pelvic mass": 5}),
        ("Major resection", "Ovarian cystectomy", (25, 0), {"Videoscopic": 25}, {"Ovarian cyst": 21, "Pelvic mass": 2}),
    ),
    ("General", "Urology"): (
        ("Major resection", "Radical prostatectomy", (0, 57), {"Robotic": 57},
         {"Prostate cancer": 56, "Adenocarcinoma of prostate": 1}),
        ("Minor resection", "Transurethral resection of bladder tumor", (11, 21), {"Videoscopic": 32},
         {"Bladder disease": 14, "Papillary transitional cell carcinoma, non-invasive": 5}),
    ),
    ("Spinal", "General surgery"): (
        ("Colorectal", "Hernia repair", (7, 89), {"Open": 96},
         {"Inguinal hernia not specified as recurrent": 41, "Inguinal hernia": 9}),
        ("Vascular", "Ligation and stripping", (20, 20), {"Open": 40}, {"Varicose vein of lower limb": 36}),
        ("Colorectal", "Transanal excision", (11, 17), {"Open": 28}, {"Rectal cancer": 10, "Rectal polyp": 3}),
    ),
    ("Spinal", "Gynecology"): (
        ("Others", "Cesarean section", (21, 0), {"Open": 21},
         {"Antenatal care for high risk pregnancy": 8,
          "Antenatal care for normal pregnancy 34 weeks or more pregnant": 3}),
    ),
    ("Sedationalgesia", "General surgery"): (
        ("Vascular", "Arteriovenous fistula", (14, 12), {"Open": 26},
         {"End stage renal disease": 15, "Abnormal electrocardiogram": 2}),
    ),
    ("Sedationalgesia", "Thoracic surgery"): (
        ("Others", "Debridement of wound", (10, 4), {"Open": 13, "Videoscopic": 1},
         {"Empyema with bronchopleural fistula": 7, "Open wound of chest wall": 2}),
    ),
}
AGE_LIMITS = {"Cesarean section": (18, 45)}  # VitalDB's cesareans: mothers of 28-44
PUMP_TRACKS = ("Orchestra/PPF20_RATE", "Orchestra/RFTN20_RATE", "Orchestra/RFTN50_RATE")


def _fits(opname: str, age: float) -> bool:
    lo, hi = AGE_LIMITS.get(opname, (0, 200))
    return lo <= age <= hi


def _candidates(ane_type: str, department: str, sex: str, age: float) -> dict[int, int]:
    """{index in PROCEDURES[(ane_type, department)]: VitalDB's cases of the
    patient's sex} of the operations that fit the patient."""
    return {i: cases[0 if sex == "F" else 1] for i, (_, opname, cases, _, _)
            in enumerate(PROCEDURES[(ane_type, department)]) if _fits(opname, age)}


def _operation(rng: np.random.Generator, tracks: Iterable[str], sex: str, age: float) -> dict:
    """ane_type, department, optype, dx, opname, approach and emop, drawn in
    VitalDB's proportions (anaesthesia by the case's pumps: spinal cases seldom
    have one; departments and operations by sex and age: no man in
    gynecology, no cesarean at 60)."""
    ane_type = _pick(rng, ANE_TYPES[any(t in PUMP_TRACKS for t in tracks)])
    open_to = {d: n for d, n in DEPARTMENTS[(ane_type, sex)].items()
               if any(_candidates(ane_type, d, sex, age).values())}
    department = _pick(rng, open_to)
    choices = PROCEDURES[(ane_type, department)]
    optype, opname, _, approaches, diagnoses = choices[_pick(rng, _candidates(ane_type, department, sex, age))]
    emergencies, cases = EMERGENCY[department]
    return {"emop": int(rng.random() < emergencies / cases), "department": department, "optype": optype,
            "dx": _pick(rng, diagnoses), "opname": opname, "approach": _pick(rng, approaches),
            "ane_type": ane_type}


def anaesthesia_period(T: int) -> tuple[int, int]:
    """[a0, a1): the anaesthesia the signals show (induction at a0, emergence at a1)."""
    return int(min(T * 0.08, 900)), int(T - min(T * 0.08, 900))


def _clinical_row(rng: np.random.Generator, case_id: int, tracks: tuple[str, ...], T: int, seed: int) -> dict:
    """The case's clinical-table row, VitalDB's columns in VitalDB's order;
    times in seconds from the recording start (casestart 0). The anaesthesia
    period lies around the one the signals show, inside the recording (in
    VitalDB anestart is mostly negative: recording began after it)."""
    first = first_operation(case_id)
    p = draw_patient(first, seed)
    age = p.age + (case_id - first) // 2  # VitalDB spans a year or so: a third operation a year older
    weight = round(float(np.clip(p.weight * (1 + rng.normal(0, 0.03)), 3.0, 150.0)), 1)
    asa = _pick(rng, ASA)
    a0, a1 = anaesthesia_period(T)
    op = min(600, (a1 - a0) // 4)
    return {"caseid": case_id, "subjectid": subject_id(case_id), "casestart": 0, "caseend": T,
            "anestart": a0 - 60, "aneend": a1 + 60, "opstart": a0 + op, "opend": a1 - op,
            "age": age, "sex": p.sex, "height": p.height, "weight": weight,
            "bmi": round(weight / (p.height / 100) ** 2, 1), "asa": None if asa is None else float(asa),
            **_operation(rng, tracks, p.sex, age)}


@dataclass(frozen=True)
class CasePlan:
    """What a case's stream decides before its signals."""

    case_id: int
    tracks: tuple[str, ...]
    duration: int
    row: dict


def _plan(case_id: int, duration_s: Optional[int], seed: int) -> tuple[CasePlan, np.random.Generator]:
    """The plan and the stream left for the signals: tracks first, then the
    duration (drawn even when given, to keep the stream in step), the row."""
    rng = case_rng(case_id, seed)
    tracks = draw_tracks(rng)
    drawn = int(rng.integers(40, 91)) * 60  # 40-90 min
    T = int(duration_s or drawn)
    return CasePlan(case_id, tracks, T, _clinical_row(rng, case_id, tracks, T, seed)), rng


def plan_case(case_id: int, duration_s: Optional[int] = None, seed: int = SEED) -> CasePlan:
    """A case's tracks, duration and clinical row without its signals (cheap)."""
    return _plan(case_id, duration_s, seed)[0]


# ---- the signals -------------------------------------------------------------------------

def _walk(rng, n, scale, smooth=120):
    """A slow, smooth random walk of length n (vectorised)."""
    steps = rng.normal(0, scale, size=n // smooth + 2)
    coarse = np.cumsum(steps)
    return np.interp(np.arange(n) / smooth, np.arange(coarse.size), coarse)


def _vitals(rng, T: int, a0: int, a1: int) -> dict[str, np.ndarray]:
    """Per second: the monitor's values, with artifacts (a cable pulled, a
    flushed arterial line)."""
    t = np.arange(T)
    anaes = (t >= a0) & (t < a1)
    hr = 78 + _walk(rng, T, 1.2) - 12 * anaes + rng.normal(0, 1.5, T)
    sbp = 135 + _walk(rng, T, 2.0) - 25 * anaes + rng.normal(0, 3, T)
    dbp = 0.56 * sbp + rng.normal(0, 2, T)
    spo2 = np.clip(98.5 + rng.normal(0, 0.7, T), 88, 100)
    etco2 = 36 + _walk(rng, T, 0.5) + rng.normal(0, 1, T)
    bis = np.where(anaes, 45 + _walk(rng, T, 1.5), 94) + rng.normal(0, 2, T)
    bt = 36.6 - 0.8 * np.clip((t - a0) / 5400, 0, 1) + 0.05 * _walk(rng, T, 0.3)  # cooling under anaesthesia
    mbp = (sbp + 2 * dbp) / 3
    for arr, bad in ((hr, 0.0), (hr, 350.0), (sbp, 400.0), (spo2, 0.0)):
        arr[rng.integers(0, T, size=max(1, T // 1500))] = bad
    return {"hr": np.round(hr), "sbp": np.round(sbp), "dbp": np.round(dbp), "mbp": np.round(mbp),
            "spo2": np.round(spo2), "etco2": np.round(etco2), "bis": np.round(bis, 1), "bt": np.round(bt, 1)}


def _ventilator(rng, sex: str, height: float, weight: float, pcv: bool, T: int, a1: int) -> dict[str, np.ndarray]:
    """Per second: what the ventilator is set to and what it measures. Tidal
    volume 6-8 mL/kg of ideal body weight (a child's own weight below 30 kg),
    FiO2 raised to 100 % for emergence; pressure control lets the volume vary."""
    t = np.arange(T)
    ibw = max((50.0 if sex == "M" else 45.5) + 0.9055 * (height - 152.4), min(weight, 30.0))
    tv_set = round(rng.uniform(6, 8) * ibw, -1)
    peep = float(_pick(rng, {0: 1, 3: 1, 5: 6, 6: 1, 8: 1}))
    fio2 = np.where(t >= a1 - 300, 100.0, float(_pick(rng, {40: 2, 50: 5, 60: 2, 80: 1})))
    rr = float(_pick(rng, {10: 2, 12: 5, 14: 2, 16: 1}))
    pcp = float(rng.integers(12, 21))
    tv = np.round(tv_set + rng.normal(0, 40 if pcv else 15, T))
    return {"tv": tv, "tv_set": np.full(T, tv_set), "peep": np.full(T, peep), "fio2_set": fio2,
            "fio2": np.round(np.clip(fio2 - np.abs(rng.normal(0, 1, T)), 21, 100)), "rr": np.full(T, rr),
            "pcp": np.full(T, pcp)}


def _infusions(tracks, weight: float, T: int, a0: int, a1: int) -> list[tuple]:
    """Pump rates (mL/h) every second while they run: propofol 20 mg/mL as
    TIVA (no sevoflurane) or for induction only, remifentanil 20 or 50 ug/mL,
    noradrenaline 20 ug/mL paused now and then (5 s: carried; 120 s: stopped)."""
    t = np.arange(T)
    anaes = (t >= a0) & (t < a1)
    out = []
    ppf_maint = 0.0 if "Primus/EXP_SEVO" in tracks else 6.0 * weight / 20.0  # mg/kg/h -> mL/h
    ppf = np.round(np.where(t < a0 + 40, 500.0, ppf_maint) * anaes * (1 + 0.1 * np.sin(t / 900.0)), 1)
    out.append(("Orchestra/PPF20_RATE", np.arange(a0, max(a0, a1 - 300)), ppf))
    for conc in (20, 50):
        rftn = np.round(0.12 * weight * 60 / conc * anaes * (1 + 0.3 * np.sin(t / 600.0)), 2)
        out.append((f"Orchestra/RFTN{conc}_RATE", np.arange(a0, max(a0, a1 - 200)), rftn))
    ne = np.round(0.05 * weight * 60 / 20.0 * (1 + 0.5 * np.sin(t / 400.0)), 2)
    tt = np.arange(a0 + 600, max(a0 + 600, a1 - 600))
    keep = ((tt // 700) % 3 != 2) | ((tt % 700) >= 120)
    keep &= ~(((tt % 500) >= 250) & ((tt % 500) < 255))
    out.append(("Orchestra/NEPI_RATE", tt[keep], ne))
    return [(name, "mL/h", times, values[times]) for name, times, values in out if name in tracks]


def _sevoflurane(rng, T: int, expired_kpa: float = 2.0) -> dict[str, np.ndarray]:
    """Per second: expired and inspired sevoflurane (kPa) of a volatile anaesthetic."""
    return {"exp_sevo": np.round(expired_kpa + rng.normal(0, 0.05, T), 2),
            "insp_sevo": np.round(expired_kpa * 1.2 + rng.normal(0, 0.05, T), 2)}


def _packets(plan: CasePlan, v: dict, a0: int, v0: int, v1: int) -> tuple:
    """(interval s, start, end, dropout share, ((track, unit, values per second), ...)):
    the tracks one device sends in one packet, recorded together."""
    T = plan.duration
    vent = (v0, max(v0, v1))
    return (
        (2, 0, T, 0.02, (("Solar8000/HR", "/min", v["hr"]),)),
        (2, min(a0 + 300, T), T, 0.02, (("Solar8000/ART_SBP", "mmHg", v["sbp"]),
                                        ("Solar8000/ART_DBP", "mmHg", v["dbp"]),
                                        ("Solar8000/ART_MBP", "mmHg", v["mbp"]))),
        (300, 0, T, 0.0, (("Solar8000/NIBP_SBP", "mmHg", v["sbp"]), ("Solar8000/NIBP_DBP", "mmHg", v["dbp"]),
                          ("Solar8000/NIBP_MBP", "mmHg", v["mbp"]))),
        (2, a0, T, 0.02, (("EV1000/ART_MBP", "mmHg", v["mbp"]),)),
        (2, 0, T, 0.02, (("Solar8000/PLETH_SPO2", "%", v["spo2"]),)),
        (2, 0, T, 0.02, (("Solar8000/BT", "C", v["bt"]),)),
        (2, 0, T, 0.02, (("Solar8000/RR", "/min", v["rr_ecg"]),)),
        (2, *vent, 0.02, (("Solar8000/ETCO2", "mmHg", v["etco2"]), ("Solar8000/FIO2", "%", v["fio2"]),
                          ("Solar8000/RR_CO2", "/min", v["rr"]))),
        (2, *vent, 0.02, (("Solar8000/VENT_TV", "mL", v["tv"]), ("Solar8000/VENT_MEAS_PEEP", "hPa", v["peep"]),
                          ("Solar8000/VENT_SET_TV", "mL", v["tv_set"]), ("Solar8000/VENT_SET_FIO2", "%", v["fio2_set"]),
                          ("Solar8000/VENT_SET_PCP", "cmH2O", v["pcp"]))),
        (1, max(0, a0 - 300), T, 0.02, (("BIS/BIS", "", v["bis"]),)),
        (7, *vent, 0.02, (("Primus/TV", "mL", v["tv"]), ("Primus/PEEP_MBAR", "mbar", v["peep"]),
                          ("Primus/FIO2", "%", v["fio2"]), ("Primus/RR_CO2", "/min", v["rr"]),
                          ("Primus/ETCO2", "mmHg", v["etco2"]), ("Primus/EXP_SEVO", "kPa", v["exp_sevo"]),
                          ("Primus/INSP_SEVO", "kPa", v["insp_sevo"]), ("Primus/SET_TV_L", "L", v["tv_set"] / 1000),
                          ("Primus/SET_INTER_PEEP", "mbar", v["peep"]), ("Primus/SET_FIO2", "%", v["fio2_set"]),
                          ("Primus/SET_RR_IPPV", "/min", v["rr"]))),
    )


def _recorded(rng, plan: CasePlan, v: dict, a0: int, v0: int, v1: int) -> list[tuple]:
    """(track, unit, seconds, values) of the case's tracks: each packet's
    seconds every interval with dropouts, drawn only for packets the case has."""
    out = []
    for every, start, end, drop, members in _packets(plan, v, a0, v0, v1):
        present = [m for m in members if m[0] in plan.tracks]
        if not present:
            continue
        t = np.arange(start, end, every)
        t = t[rng.random(t.size) >= drop] if drop else t
        out += [(name, unit, t, values[t]) for name, unit, values in present]
    return out


def generate_case(case_id: int, duration_s: Optional[int] = None, waveforms: bool = False,
                  rename: Optional[dict[str, str]] = None, seed: int = SEED) -> tuple[vitaldb.VitalFile, dict]:
    """One synthetic case as a VitalFile plus its clinical-table row, from
    the case's one stream: its tracks, duration (40-90 min unless given) and
    row (plan_case), then the signals of the tracks it has. `rename` records
    tracks under other names ({VitalDB name: the other device's})."""
    plan, rng = _plan(case_id, duration_s, seed)
    T, row = plan.duration, plan.row
    a0, a1 = anaesthesia_period(T)
    v0, v1 = a0 + 120, a1 - 120  # ventilation
    v = _vitals(rng, T, a0, a1)
    v.update(_ventilator(rng, row["sex"], row["height"], row["weight"], "Solar8000/VENT_SET_PCP" in plan.tracks,
                         T, a1))
    v.update(_sevoflurane(rng, T))
    t = np.arange(T)
    v["rr_ecg"] = np.where((t >= v0) & (t < v1), v["rr"], 15.0)  # the ventilator's rate, else breathing
    series = _recorded(rng, plan, v, a0, v0, v1) + _infusions(plan.tracks, row["weight"], T, a0, a1)
    vf = vitaldb.VitalFile()
    vf.dtstart, vf.dtend = DT0 + case_id * 86400.0, DT0 + case_id * 86400.0 + T
    order = {name: i for i, name in enumerate(TRACK_ORDER)}
    for name, unit, times, values in sorted(series, key=lambda s: order[s[0]]):
        if len(times):
            recs = [{"dt": d, "val": x} for d, x in zip((vf.dtstart + times).tolist(), values.tolist())]
            vf.add_track((rename or {}).get(name, name), recs, unit=unit)
    if waveforms:
        _add_waveforms(vf, rng, T, v["hr"])
    return vf, row


def _add_waveforms(vf, rng, T, hr):
    """500 Hz ECG and PLETH, 62.5 Hz CO2, quantised like 16-bit ADC samples,
    in 1 s records: real files' bulk, so sizes and parse times resemble them."""
    for name, srate, unit, gain in (("SNUADC/ECG_II", 500, "mV", 0.005), ("SNUADC/PLETH", 500, "", 0.05),
                                    ("Primus/CO2", 62.5, "mmHg", 0.1)):
        n = int(T * srate)
        ts = np.arange(n) / srate
        beat = np.repeat(np.maximum(hr, 40) / 60.0, int(np.ceil(srate)))[: n] if srate >= 1 else None
        phase = np.cumsum(beat) / srate if beat is not None else ts
        if name.endswith("CO2"):
            sig = 38 * (np.sin(2 * np.pi * ts * 12 / 60) > 0)
        else:
            sig = np.sin(2 * np.pi * phase) ** 15 + 0.2 * np.sin(2 * np.pi * phase * 2)
        sig = np.round((sig + rng.normal(0, 0.02, n)) / gain) * gain  # quantised samples
        sig = sig.astype(np.float32)
        step = int(srate)
        recs = [{"dt": vf.dtstart + float(s), "val": sig[int(s * srate): int(s * srate) + step]}
                for s in range(T)]
        vf.add_track(name, recs, srate=srate, unit=unit)


# ---- the track table ---------------------------------------------------------------------

def track_id(case_id: int, tname: str, copy: int = 0, seed: int = SEED) -> str:
    """A track's tid: 40 hex digits like VitalDB's, the same on every host."""
    return hashlib.sha1(f"{seed}:{case_id}:{tname}:{copy}".encode()).hexdigest()


def track_rows(case_id: int, names: Iterable[str], twice: Iterable[str] = (), seed: int = SEED) -> list[tuple]:
    """(caseid, tname, tid) rows of one case's tracks; a name in `twice` gets
    two rows with two tids, as VitalDB lists some tracks."""
    twice = set(twice)
    return [(case_id, n, track_id(case_id, n, k, seed)) for n in names for k in range(2 if n in twice else 1)]


def trks_csv(rows: list[tuple]) -> bytes:
    """The track table as VitalDB's <api>/trks sends it (before its gzip)."""
    buf = io.StringIO()
    pd.DataFrame(rows, columns=list(TRKS_COLUMNS)).to_csv(buf, index=False)
    return buf.getvalue().encode()


# ---- writing -----------------------------------------------------------------------------

# How a .vital file lays out its records (vitaldb's "Vital File Format.md"):
LAYOUTS = ("packed",  # VitalDB's open dataset 1.0.1: track by track, numeric first, waveforms last
           "unpacked",  # older downloads: track by track, no packed flag (read to the end)
           "interleaved")  # Vital Recorder's own files: every track's records in time order, as recorded


def write_vital(vf: vitaldb.VitalFile, path: str, layout: str = "packed", compresslevel: int = 6) -> None:
    """`vf` as a .vital file in one of LAYOUTS (gzip level 6 like VitalDB's;
    9 is 7x slower to write)."""
    if layout == "packed":
        vf.to_vital(path, compresslevel=compresslevel)
    elif layout == "unpacked":
        vf.to_vital(path, compresslevel=compresslevel, packed=False)
    elif layout == "interleaved":
        tmp = path + ".unpacked"
        vf.to_vital(tmp, compresslevel=1, packed=False)
        with gzip.open(tmp, "rb") as fh:
            data = fh.read()
        os.remove(tmp)
        with gzip.open(path, "wb", compresslevel=compresslevel) as fh:
            fh.write(interleave_records(data))
    else:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")


def interleave_records(data: bytes) -> bytes:
    """An unpacked .vital body (uncompressed) rewritten as Vital Recorder
    writes while it records: device and track infos first, then the records
    of all tracks in time order (a stable sort: a track's own order is
    kept), then the commands. Track infos lose the optional reclen,
    trk_dtstart and trk_dtend (the last 20 bytes), which a recorder cannot
    know in advance and which readers use to skip a track's contiguous block."""
    headerlen = struct.unpack_from("<H", data, 8)[0]
    head, pos = data[:10 + headerlen], 10 + headerlen
    infos, recs, cmds = [], [], []
    while pos < len(data):
        kind = data[pos]
        (length,) = struct.unpack_from("<I", data, pos + 1)
        body = data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if kind == 0:  # TRKINFO: drop reclen (4), trk_dtstart (8), trk_dtend (8)
            body = body[:-20]
            infos.append(bytes([kind]) + struct.pack("<I", len(body)) + body)
        elif kind == 1:  # REC: infolen (2), dt (8), trkid (2), values
            recs.append((struct.unpack_from("<d", body, 2)[0], bytes([kind]) + struct.pack("<I", length) + body))
        elif kind == 9:
            infos.append(bytes([kind]) + struct.pack("<I", length) + body)
        else:
            cmds.append(bytes([kind]) + struct.pack("<I", length) + body)
    recs.sort(key=lambda r: r[0])
    return head + b"".join(infos) + b"".join(r for _, r in recs) + b"".join(cmds)


def _store_vital(vf: vitaldb.VitalFile, output: str, case_id: int, layout: str, tmp: str) -> None:
    """`vf` written locally in `layout`, then to `output` (any Beam filesystem) at once."""
    local = os.path.join(tmp, f"{case_id:04d}.vital")
    write_vital(vf, local, layout)
    with open(local, "rb") as fh:
        storage.write_atomic(storage.join(output, f"{case_id:04d}.vital"), fh.read())
    os.remove(local)


def _with_entry_errors(row: dict, case_id: int, missing_weight, missing_asa, implausible_weight) -> dict:
    """The row as the deliberate situations make it."""
    if case_id == missing_weight:
        row["weight"], row["bmi"] = None, None
    if case_id == missing_asa:
        row["asa"] = None
    if case_id == implausible_weight:  # an entry error (contract 1.1): treated as missing
        row["weight"], row["bmi"] = IMPLAUSIBLE_WEIGHT_KG, None
    return row


def write_sample(output: str, case_ids: list[int], duration_s: Optional[int] = None, waveforms: bool = False,
                 short_case: Optional[int] = None, missing_weight: Optional[int] = None,
                 missing_asa: Optional[int] = None, no_clinical_row: Optional[int] = None,
                 implausible_weight: Optional[int] = None, rename: Optional[dict[str, str]] = None,
                 layout: str = "packed", seed: int = SEED) -> str:
    """Writes <id:04d>.vital files (in `layout`, see LAYOUTS), clinical_data.csv
    and trks.csv (every file's tracks; the first case with TRACKED_TWICE lists
    it twice) to `output` (any Beam filesystem); returns the clinical table's
    path. Durations vary 40-90 min unless `duration_s` is given; `short_case`
    is shorter than one window; `rename` writes tracks under another device's
    names."""
    rows, trks, doubled = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        for cid in case_ids:
            vf, row = generate_case(cid, 240 if cid == short_case else duration_s, waveforms, rename, seed)
            _store_vital(vf, output, cid, layout, tmp)
            names = vf.get_track_names()
            if doubled is None and TRACKED_TWICE in names:
                doubled = cid
            trks += track_rows(cid, names, [TRACKED_TWICE] if doubled == cid else [], seed)
            if cid != no_clinical_row:
                rows.append(_with_entry_errors(row, cid, missing_weight, missing_asa, implausible_weight))
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    path = storage.join(output, CLINICAL_FILE)  # where a folder's table is looked for
    storage.write_atomic(path, buf.getvalue().encode())
    storage.write_atomic(storage.join(output, TRKS_FILE), trks_csv(trks))
    return path


def sample_case_ids(n: int, settings: Optional[Settings] = None) -> list[int]:
    """n case ids that fill every split in proportion (at least one case in
    each split with a non-zero share, once n allows), taking whole patients
    (every operation of a patient, contract 1.2 keeps them in one split):
    the lowest patients whose split still has room, under the run's split
    settings; sorted."""
    settings = settings or Settings()
    names = settings.split_names
    wanted = list(settings.split_shares)
    quota = [int(n * p / 100) for p in wanted]
    for i in sorted(range(len(names)), key=lambda i: -wanted[i]):  # hand out what rounding left
        if sum(quota) >= n:
            break
        quota[i] += 1
    for i, p in enumerate(wanted):  # every non-empty split gets a case, taken from the largest
        if p and not quota[i] and n >= sum(1 for x in wanted if x):
            quota[quota.index(max(quota))] -= 1
            quota[i] = 1
    ids, taken = [], [0] * len(names)
    cid = 0
    while len(ids) < n:
        cid += 1
        if first_operation(cid) != cid:
            continue
        cases = patient_cases(cid)
        k = names.index(sample_split(cid, settings))
        if taken[k] + len(cases) <= quota[k]:
            taken[k] += len(cases)
            ids += cases
    return sorted(ids)


def write_default_sample(output: str, n: int = 20, settings: Optional[Settings] = None,
                         layout: str = "packed", seed: int = SEED) -> str:
    """The embedded sample: n cases in every split, with every situation a
    user meets (patients with two and three operations, a missing weight, a
    missing ASA, an entry error, a case too short for one window)."""
    ids = sample_case_ids(n, settings)
    return write_sample(output, ids, short_case=ids[-1] if n >= 3 else None,
                        missing_weight=ids[1] if n >= 2 else None, missing_asa=ids[2] if n >= 3 else None,
                        implausible_weight=ids[3] if n >= 5 else None, layout=layout, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="master-poc-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="folder or s3:// prefix for the .vital files and clinical table")
    ap.add_argument("--cases", type=int, default=20,
                    help="number of cases (ids chosen so every split has cases; with --hours or --waveforms: 1..N)")
    ap.add_argument("--hours", type=float, default=None, help="fixed duration of every case (default 40-90 min)")
    ap.add_argument("--waveforms", action="store_true", help="add 500 Hz ECG/PLETH and 62.5 Hz CO2 waveforms")
    ap.add_argument("--layout", choices=LAYOUTS, default="packed",
                    help="packed (VitalDB 1.0.1: numeric tracks first, waveforms last), unpacked (older "
                         "downloads), interleaved (Vital Recorder: all tracks' records in time order)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"the random seed (default {SEED}): same seed, same files")
    args = ap.parse_args(argv)
    if args.hours is None and not args.waveforms:
        path = write_default_sample(args.output, args.cases, layout=args.layout, seed=args.seed)
    else:
        dur = int(args.hours * 3600) if args.hours else None
        path = write_sample(args.output, list(range(1, args.cases + 1)), dur, args.waveforms, layout=args.layout,
                            seed=args.seed)
    print(f"wrote {args.cases} cases, {path} and {storage.join(args.output, TRKS_FILE)}")  # the ids: see the table
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
