"""Benchmark: deciding a cohort's flow on tables of the real VitalDB sizes (not a pytest test).

    .venv/bin/python tests/benchmarks/cohort.py        # ~30 s

Writes a 6,388-row clinical table with VitalDB's columns and a 486,449-row
track table (caseid,tname,tid: VitalDB's /trks is 30.6 MB) into --workdir,
then times what a run does before stage 1 with the criteria of a typical
study (age >= 18, general anaesthesia, not a transplant, the drug pumps and
an arterial line required): reading both tables, checking the criteria,
deciding the flow. Target: at most 5 s in all. Then, through the web API
stand-in (tests/webstandin.py, its own process on loopback) with --input
vitaldb: the case-file bytes an excluded case cost (target: 0).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from transforms import cohort, spec  # noqa: E402

N_CASES, N_TRACK_ROWS = 6388, 486449
STUDY = [{"include": "age >= 18"}, {"include": "ane_type == 'General'"},
         {"exclude": "opname.str.contains('transplant', case=False, na=False)"},
         {"require": "Propofol_INF,Remifentanil_INF,BP_MAP"}]


def write_tables(workdir: str) -> tuple[str, str]:
    rng = np.random.default_rng(7)
    ids = np.arange(1, N_CASES + 1)
    clinical = pd.DataFrame({
        "caseid": ids, "subjectid": rng.integers(1, 6091, N_CASES), "casestart": 0,
        "caseend": rng.integers(1800, 30000, N_CASES), "anestart": -rng.integers(0, 1800, N_CASES),
        "aneend": rng.integers(1800, 30000, N_CASES), "age": rng.uniform(0.3, 94, N_CASES).round(1),
        "sex": rng.choice(["M", "F"], N_CASES), "height": rng.normal(162, 9, N_CASES).round(1),
        "weight": rng.normal(61, 11, N_CASES).round(1), "bmi": rng.normal(23, 3.5, N_CASES).round(1),
        "asa": rng.choice([1, 2, 3, 4, 6], N_CASES), "emop": rng.choice([0, 1], N_CASES, p=[.9, .1]),
        "department": rng.choice(["General surgery", "Thoracic surgery", "Urology", "Gynecology"], N_CASES),
        "optype": "Colorectal", "opname": rng.choice(["Low anterior resection", "Liver transplantation",
                                                      "Lobectomy, VATS"], N_CASES),
        "approach": rng.choice(["Open", "Videoscopic", "Robotic"], N_CASES),
        "ane_type": rng.choice(["General", "Spinal", "Sedationalgesia"], N_CASES, p=[.946, .043, .011]),
    })
    for extra in range(74 - clinical.shape[1]):  # VitalDB's table has 74 columns
        clinical[f"lab_{extra}"] = rng.normal(1, 0.1, N_CASES).round(2)
    names = [t for f in spec.DEFAULT_SPEC.timeseries for t in (s.track for s in f.sources)]
    names += [f"Device{i}/TRACK{j}" for i in range(20) for j in range(8)]  # the 196 names' long tail
    trks = pd.DataFrame({"caseid": rng.integers(1, N_CASES + 1, N_TRACK_ROWS),
                         "tname": rng.choice(names, N_TRACK_ROWS)})
    trks["tid"] = [f"{i:040x}" for i in range(N_TRACK_ROWS)]
    c_path, t_path = os.path.join(workdir, "clinical_data.csv"), os.path.join(workdir, "trks.csv")
    clinical.to_csv(c_path, index=False)
    trks.to_csv(t_path, index=False)
    return c_path, t_path


def decide(c_path: str, t_path: str) -> dict:
    from pipeline.io.clinical import read_clinical
    from pipeline.output import cohort as cohort_run
    times = {}
    t = time.perf_counter()
    table = read_clinical(c_path)
    times["read clinical table"] = time.perf_counter() - t
    t = time.perf_counter()
    trks = cohort_run.read_track_table(t_path)
    times["read track table"] = time.perf_counter() - t
    t = time.perf_counter()
    crit = cohort.ordered(cohort.parse_criteria(STUDY))
    cohort.check(crit, table.frame, spec.DEFAULT_SPEC)
    times["check criteria"] = time.perf_counter() - t
    t = time.perf_counter()
    p = cohort_run.plan(table.case_ids, crit, table, spec.DEFAULT_SPEC, trks, t_path)
    times["decide the flow"] = time.perf_counter() - t
    times["selected"] = len(p.work)
    return times


def excluded_case_bytes(workdir: str) -> tuple[int, int, int]:
    """(excluded cases, case-file bytes sent for them, bytes sent for the selected) of a run with
    --input vitaldb and track criteria, against the web API stand-in (its own thread, loopback)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import json

    from webstandin import StandIn

    from pipeline import cli
    from pipeline.io.sources import VITALDB_API_ENV
    from pipeline.tools import sample
    files, out = os.path.join(workdir, "api-files"), os.path.join(workdir, "web-out")
    sample.write_sample(files, list(range(1, 13)), 1800)
    with StandIn(files) as api:
        os.environ[VITALDB_API_ENV] = api.url
        rc = cli.main(["--input", "vitaldb", "--output", out, "--overwrite", "--require", "Propofol_INF,BP_MAP",
                       "--direct_running_mode=in_memory"], supervised=False)
        meta = json.load(open(os.path.join(out, "preprocessing_metadata.json")))
        excluded = [c for r in meta["cohort"]["criteria"] for c in r["excluded"]]
        sent_out = sum(api.sent_for(c) for c in excluded)
        sent_in = sum(api.sent_for(c) for c in range(1, 13) if c not in excluded)
    assert rc == 0
    return len(excluded), sent_out, sent_in


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "bench-out", "cohort"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    c_path, t_path = write_tables(args.workdir)
    print(f"clinical table: {N_CASES} rows, {os.path.getsize(c_path) / 1e6:.1f} MB; "
          f"track table: {N_TRACK_ROWS} rows, {os.path.getsize(t_path) / 1e6:.1f} MB")
    runs = [decide(c_path, t_path) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: sum(v for k, v in r.items() if k != "selected"))
    total = sum(v for k, v in best.items() if k != "selected")
    for k, v in best.items():
        print(f"  {k:22s} {v:8.3f}{' s' if k != 'selected' else ' cases'}")
    print(f"  {'total':22s} {total:8.3f} s   (target <= 5 s: {'met' if total <= 5 else 'MISSED'})")
    n, sent_out, sent_in = excluded_case_bytes(args.workdir)
    print(f"--input vitaldb with --require Propofol_INF,BP_MAP on 12 sample cases: {n} left out by the API's track "
          f"table, {sent_out} case-file bytes sent for them (target 0: {'met' if sent_out == 0 else 'MISSED'}); "
          f"{sent_in} bytes for the {12 - n} selected")
    return 0 if total <= 5 and sent_out == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
