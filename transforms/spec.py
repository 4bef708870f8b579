"""The feature spec: the data contract (docs/data-contract.md) as data.

Every number of the contract (feature order, units, source tracks and their
conversion factors, plausible ranges, imputation rules, normalisation ranges,
targets, static defaults) lives here and nowhere else. The transforms read it,
and `spec_as_dict()` writes it into `preprocessing_metadata.json`, so a
consumer can decode and de-normalise without this code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np

# 1.1: clinical entry errors (implausible values, duplicate rows); 1.2: splits by
# patient (the clinical table's subjectid), not by case; 1.3: anaesthesia times
# (anestart, aneend) that are entry errors count as missing and are listed.
SPEC_VERSION = "1.3"

# Contract 1.3: anestart/aneend (seconds from casestart) outside this range are entry errors.
ANAESTHESIA_PLAUSIBLE_S = (-86400.0, 172800.0)  # one day before casestart .. two days after

MMHG_PER_KPA = 7.50062
CMH2O_PER_HPA = 1.01972

# Dose conversions divide by a per-case body size.
PER_NONE = ""
PER_WEIGHT = "weight"  # actual body weight (kg), 70 kg if unknown
PER_IBW = "ibw"  # Devine ideal body weight (kg)


@dataclass(frozen=True)
class Source:
    """One VitalDB track feeding a feature: value = raw * factor / per."""

    track: str  # always the full Device/TRACK name
    unit: str  # the raw unit VitalDB records
    factor: float = 1.0
    per: str = PER_NONE
    # The plausible raw range in this source's own unit, where it differs from the
    # feature's (a track map's source in litres where the feature's range is in mL).
    plausible: Optional[tuple[float, float]] = None

    def plausible_for(self, feature: "Feature") -> tuple[float, float]:
        return self.plausible if self.plausible is not None else feature.plausible


@dataclass(frozen=True)
class Feature:
    name: str
    unit: str
    sources: tuple[Source, ...]
    plausible: tuple[float, float]  # on the raw source values
    before: float  # before the first valid sample, and when nothing is valid
    after_carry_s: int  # seconds the last value is carried after the last sample
    after: float  # value after the carry
    norm: tuple[float, float]  # (lo, hi) of the [-1, 1] normalisation
    max_gap_s: Optional[int] = None  # longer gaps are a clinical zero (pump stopped)


@dataclass(frozen=True)
class Static:
    name: str
    column: str  # clinical_data.csv column
    default: float
    norm: Optional[tuple[float, float]]  # None: categorical (sex: M=+1, F=-1)
    # Inclusive range of a believable entry; outside it the value is an entry
    # error and treated as missing (also for dose weight and IBW).
    plausible: Optional[tuple[float, float]] = None
    unit: str = ""

    @property
    def span(self) -> tuple[float, float]:
        """The range of its values in the examples: (lo, hi), or the codes -1..+1."""
        return self.norm if self.norm else (-1.0, 1.0)


def _vital(name, unit, sources, plausible, before, carry_s, lo, hi):
    return Feature(name, unit, sources, plausible, before, carry_s, before, (lo, hi))


def _zeroed(name, unit, sources, plausible, lo, hi, max_gap_s=None):
    return Feature(name, unit, sources, plausible, 0.0, 0, 0.0, (lo, hi), max_gap_s)


_S = Source
ML_H = "mL/h"

TIMESERIES: tuple[Feature, ...] = (
    _vital("HR", "1/min", (_S("Solar8000/HR", "1/min"),), (20, 300), 70, 600, 20, 200),
    _vital("BP_SYS", "mmHg", (_S("Solar8000/ART_SBP", "mmHg"), _S("Solar8000/NIBP_SBP", "mmHg")),
           (20, 300), 140, 600, 60, 250),
    _vital("BP_DIA", "mmHg", (_S("Solar8000/ART_DBP", "mmHg"), _S("Solar8000/NIBP_DBP", "mmHg")),
           (5, 250), 80, 600, 30, 150),
    _vital("BP_MAP", "mmHg", (_S("Solar8000/ART_MBP", "mmHg"), _S("Solar8000/NIBP_MBP", "mmHg"),
                              _S("EV1000/ART_MBP", "mmHg")),
           (10, 250), 100, 600, 40, 180),
    _vital("SPO2", "%", (_S("Solar8000/PLETH_SPO2", "%"),), (30, 100), 96, 300, 70, 100),
    _zeroed("ETCO2", "kPa", (_S("Solar8000/ETCO2", "mmHg", 1 / MMHG_PER_KPA),
                             _S("Primus/ETCO2", "mmHg", 1 / MMHG_PER_KPA)), (0, 150), 2.0, 8.0),
    _zeroed("BIS", "index", (_S("BIS/BIS", "index"),), (0, 100), 0, 100),
    _zeroed("Propofol_INF", "mg/kg/h", (_S("Orchestra/PPF20_RATE", ML_H, 20.0, PER_WEIGHT),),
            (0, 1200), 0, 12),
    _zeroed("Remifentanil_INF", "ug/kg/min",
            (_S("Orchestra/RFTN20_RATE", ML_H, 20.0 / 60, PER_WEIGHT),
             _S("Orchestra/RFTN50_RATE", ML_H, 50.0 / 60, PER_WEIGHT)), (0, 1200), 0, 0.8),
    _zeroed("Noradrenalin_INF", "ug/kg/min", (_S("Orchestra/NEPI_RATE", ML_H, 20.0 / 60, PER_WEIGHT),),
            (0, 1200), 0, 0.5, max_gap_s=10),
    _zeroed("TV", "mL/kg IBW", (_S("Solar8000/VENT_TV", "mL", 1.0, PER_IBW), _S("Primus/TV", "mL", 1.0, PER_IBW)),
            (0, 2000), 0, 12),
    _zeroed("PEEP", "cmH2O", (_S("Solar8000/VENT_MEAS_PEEP", "hPa", CMH2O_PER_HPA),
                              _S("Primus/PEEP_MBAR", "mbar", CMH2O_PER_HPA)), (0, 50), 0, 30),
    _zeroed("FIO2", "%", (_S("Solar8000/FIO2", "%"), _S("Primus/FIO2", "%")), (15, 100), 21, 100),
    _zeroed("RR", "1/min", (_S("Primus/RR_CO2", "1/min"), _S("Solar8000/RR_CO2", "1/min"), _S("Solar8000/RR", "1/min")),
            (0, 100), 6, 30),
    _zeroed("etSEV", "kPa", (_S("Primus/EXP_SEVO", "kPa"),), (0, 10), 0, 6),
    _zeroed("inSev", "kPa", (_S("Primus/INSP_SEVO", "kPa"),), (0, 10), 0, 8),
)

TARGETS: tuple[str, ...] = (
    "Propofol_INF", "Remifentanil_INF", "Noradrenalin_INF", "TV", "PEEP", "FIO2", "RR", "etSEV")

STATIC: tuple[Static, ...] = (
    Static("age", "age", 50.0, (0, 120), plausible=(0, 120), unit="years"),
    Static("sex", "sex", -1.0, None, unit="M +1, F -1"),  # default F; 'M'/'F' in any case, spaces ignored
    Static("height", "height", 170.0, (100, 230), plausible=(30, 250), unit="cm"),
    Static("weight", "weight", 70.0, (20, 200), plausible=(1, 350), unit="kg"),
    # Missing or implausible: weight / (height / 100) ** 2 from plausible
    # weight and height, itself checked against the same range.
    Static("bmi", "bmi", 24.2, (10, 50), plausible=(5, 100), unit="kg/m2"),
    Static("asa", "asa", 2.0, (1, 6), plausible=(1, 6), unit="class"),
)
SEX_CODES = {"M": 1.0, "F": -1.0}
STATIC_BY_NAME = {s.name: s for s in STATIC}

# Body size for dose conversion: a missing or implausible weight or height is
# the static feature's default.
DEFAULT_DOSE_WEIGHT_KG = STATIC_BY_NAME["weight"].default
DEFAULT_HEIGHT_CM = STATIC_BY_NAME["height"].default
IBW_BASE_KG = {"M": 50.0, "F": 45.5}
IBW_KG_PER_CM = 0.9055
IBW_REF_CM = 152.4
IBW_CLAMP_KG = (30.0, 150.0)

# Windows and splits.
WINDOW_S = 300
STEP_S = 30
HORIZON_S = 1
SPLIT_NAMES = ("train", "validation", "test")
SPLIT_PERCENT = (70, 15, 15)
SPLIT_SEED = 42

N_STATIC = len(STATIC)


@dataclass(frozen=True)
class FeatureSpec:
    """The time-series features of a run and its targets: the built-in table
    above (DEFAULT_SPEC), or one with other source tracks (a track map).
    Consumers take it as an argument and assume no fixed number of features
    or sources."""

    timeseries: tuple[Feature, ...]
    targets: tuple[str, ...]

    @cached_property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.timeseries)

    @cached_property
    def target_index(self) -> np.ndarray:
        return np.array([self.feature_names.index(n) for n in self.targets], dtype=np.int64)

    @property
    def n_features(self) -> int:
        return len(self.timeseries)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @cached_property
    def source_tracks(self) -> tuple[str, ...]:
        """Every track the loader asks vitaldb for, each once, in a fixed order."""
        return tuple(dict.fromkeys(s.track for f in self.timeseries for s in f.sources))

    @property
    def max_sources(self) -> int:
        return max((len(f.sources) for f in self.timeseries), default=0)

    @cached_property
    def norm_lo(self) -> np.ndarray:
        return np.array([f.norm[0] for f in self.timeseries], dtype=np.float64)

    @cached_property
    def norm_hi(self) -> np.ndarray:
        return np.array([f.norm[1] for f in self.timeseries], dtype=np.float64)

    def feature(self, name: str) -> Feature:
        return self.timeseries[self.feature_names.index(name)]

    def timeseries_as_dict(self) -> list[dict]:
        def feat(i: int, f: Feature) -> dict:
            d = dataclasses.asdict(f)
            d["norm"] = {"lo": f.norm[0], "hi": f.norm[1]}
            d["plausible_raw"] = list(d.pop("plausible"))
            for src in d["sources"]:  # a source's own range only where it has one
                if src["plausible"] is None:
                    del src["plausible"]
                else:
                    src["plausible_raw"] = list(src.pop("plausible"))
            d["after_last_valid"] = {"carry_s": d.pop("after_carry_s"), "then": d.pop("after")}
            return dict(index=i, **d)
        return [feat(i, f) for i, f in enumerate(self.timeseries)]


DEFAULT_SPEC = FeatureSpec(TIMESERIES, TARGETS)


def spec_as_dict(fs: FeatureSpec = DEFAULT_SPEC) -> dict:
    """The whole contract as JSON-able data (written into the metadata)."""
    return {
        "spec_version": SPEC_VERSION,
        "normalisation": "norm = clip((v - lo) / (hi - lo) * 2 - 1, -1, 1); v = lo + (norm + 1) * (hi - lo) / 2",
        "timeseries": fs.timeseries_as_dict(),
        "targets": [{"index": i, "name": n, "feature_index": int(fs.target_index[i]),
                     "unit": fs.feature(n).unit, "norm": {"lo": fs.feature(n).norm[0], "hi": fs.feature(n).norm[1]}}
                    for i, n in enumerate(fs.targets)],
        "static": [{"index": i, "name": s.name, "column": s.column, "unit": s.unit, "default": s.default,
                    "norm": ({"lo": s.norm[0], "hi": s.norm[1]} if s.norm else None),
                    "plausible": list(s.plausible) if s.plausible else None,
                    **({"codes": SEX_CODES} if s.norm is None else {})}
                   for i, s in enumerate(STATIC)],
        "clinical_entry_errors": "a value outside 'plausible' (or a non-number, or a sex other than M/F) "
                                 "is treated as missing and listed per case as implausible; a case with "
                                 "two different clinical rows fails with reason duplicate_clinical_row",
        "anaesthesia_times": {"columns": ["anestart", "aneend"], "unit": "s from casestart",
                              "plausible_s": list(ANAESTHESIA_PLAUSIBLE_S),
                              "rule": "outside plausible_s, or aneend not greater than anestart (both), an "
                                      "entry error: missing (the crop's bound is then the recording's own) "
                                      "and listed per case as implausible"},
        "split": {"key": "'s' + subjectid (an integral number in decimal without padding, else as written, "
                           "stripped) where the case's clinical row has one, else the case id in decimal",
                  "bucket": "int(sha256(f'{seed}:{key}')) % 100", "names": list(SPLIT_NAMES)},
        "dose_weight": {"default_kg": DEFAULT_DOSE_WEIGHT_KG, "plausible_kg": list(STATIC_BY_NAME["weight"].plausible)},
        "ibw": {"formula": "Devine", "base_kg": IBW_BASE_KG, "kg_per_cm": IBW_KG_PER_CM,
                "ref_cm": IBW_REF_CM, "clamp_kg": list(IBW_CLAMP_KG), "default_height_cm": DEFAULT_HEIGHT_CM},
    }
