"""Generates VitalDB-format sample cases with the `vitaldb` library.

    master-poc-generate --output data/sample --cases 20 [--hours 4 --waveforms] [--layout interleaved]

Realistic, not noise: device intervals as in VitalDB (Solar 8000 every 2 s,
Primus every 7 s, BIS and Orchestra every 1 s, NIBP every 5 min), an
anaesthesia period with induction, infusions (propofol, remifentanil 20 or
50 ug/mL, noradrenaline with pauses), ventilation and sevoflurane; some cases
with NIBP only, missing devices (no BIS, no pumps), artifacts, a too-short
case, and a clinical table with VitalDB's columns (patients with two and
three operations under one subjectid, a missing ASA, a missing weight, a
weight entered as 900 kg). Files are packed as VitalDB 1.0.1 serves them,
or unpacked, or interleaved as Vital Recorder writes them (--layout). The
embedded sample's case ids are chosen so that train, validation and test
all get patients. Same case id and options -> same file, on every host.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import struct
import tempfile
from typing import Optional

import numpy as np
import pandas as pd
import vitaldb

from pipeline import storage
from transforms.settings import Settings
from transforms.sources import CLINICAL_FILE
from transforms.windows import assign_split, split_key

DT0 = 4102444800.0  # 2100-01-01, like VitalDB's anonymised start times
IMPLAUSIBLE_WEIGHT_KG = 900.0


def _walk(rng, n, scale, smooth=120):
    """A slow, smooth random walk of length n (vectorised)."""
    steps = rng.normal(0, scale, size=n // smooth + 2)
    coarse = np.cumsum(steps)
    return np.interp(np.arange(n) / smooth, np.arange(coarse.size), coarse)


def _sampled(t_all, values, interval, rng, start=0, end=None, drop=0.02):
    """Times and values recorded every `interval` s in [start, end), with dropouts."""
    end = len(t_all) if end is None else end
    t = np.arange(start, end, interval)
    t = t[rng.random(t.size) >= drop]
    return t, values[t]


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
    """The split a generated case lands in (by its patient, contract 1.2)."""
    settings = settings or Settings()
    return assign_split(split_key(case_id, subject_id(case_id)), settings.split, settings.split_seed,
                        settings.split_names, settings.folds)


def case_profile(case_id: int) -> dict:
    rng = np.random.default_rng(1000 + case_id)
    return {
        "arterial": rng.random() < 0.7,
        "bis": rng.random() < 0.87,
        "pumps": rng.random() < 0.77,
        "tiva": rng.random() < 0.5,
        "rftn50": rng.random() < 0.3,
        "nepi": rng.random() < 0.35,
        "ev1000": rng.random() < 0.1,
        "solar_vent": rng.random() < 0.2,
        # the patient's sex (the first operation's draw)
        "sex": "M" if rng.random() < 0.5 else "F" if first_operation(case_id) == case_id
        else case_profile(first_operation(case_id))["sex"],
    }


def _body(case_id: int) -> tuple[float, float, float]:
    """(height, weight, age) as a case's own draws make them."""
    rng = np.random.default_rng(case_id)
    male = case_profile(case_id)["sex"] == "M"
    height = float(np.round(rng.normal(174 if male else 161, 7), 1))
    weight = float(np.clip(np.round(rng.normal(75 if male else 60, 11), 1), 40, 140))
    age = float(rng.integers(18, 90))
    return height, weight, age


def generate_case(case_id: int, duration_s: int, waveforms: bool = False,
                  rename: Optional[dict[str, str]] = None) -> tuple[vitaldb.VitalFile, dict]:
    """One synthetic case as a VitalFile plus its clinical-table row; `rename`
    records tracks under other names ({VitalDB name: the other device's})."""
    rename = rename or {}
    rng = np.random.default_rng(case_id)
    p = case_profile(case_id)
    T = int(duration_s)
    male = p["sex"] == "M"
    height, weight, age = _body(case_id)
    rng.normal(size=2), rng.integers(18, 90)  # the draws _body made from this generator
    first = first_operation(case_id)
    if first != case_id:  # a later operation: the patient's height, and older
        h0, _, age0 = _body(first)
        height, age = h0, min(age0 + (case_id - first), 95.0)
    t = np.arange(T)
    a0 = int(min(T * 0.08, 900))  # anaesthesia start
    a1 = int(T - min(T * 0.08, 900))  # anaesthesia end
    v0, v1 = a0 + 120, a1 - 120  # ventilation
    anaes = (t >= a0) & (t < a1)

    hr = 78 + _walk(rng, T, 1.2) - 12 * anaes + rng.normal(0, 1.5, T)
    sbp = 135 + _walk(rng, T, 2.0) - 25 * anaes + rng.normal(0, 3, T)
    dbp = 0.56 * sbp + rng.normal(0, 2, T)
    mbp = (sbp + 2 * dbp) / 3
    spo2 = np.clip(98.5 + rng.normal(0, 0.7, T), 88, 100)
    etco2 = 36 + _walk(rng, T, 0.5) + rng.normal(0, 1, T)
    bis = np.where(anaes, 45 + _walk(rng, T, 1.5), 94) + rng.normal(0, 2, T)

    # Artifacts: a cable pulled, a flushed arterial line.
    for arr, bad in ((hr, 0.0), (hr, 350.0), (sbp, 400.0), (spo2, 0.0)):
        idx = rng.integers(0, T, size=max(1, T // 1500))
        arr[idx] = bad

    vf = vitaldb.VitalFile()
    vf.dtstart, vf.dtend = DT0 + case_id * 86400.0, DT0 + case_id * 86400.0 + T

    def add(name, unit, times, vals):
        name = rename.get(name, name)
        if len(times):
            vf.add_track(name, [{"dt": vf.dtstart + float(a), "val": float(b)} for a, b in zip(times, vals)],
                         unit=unit)

    add("Solar8000/HR", "/min", *_sampled(t, np.round(hr), 2, rng))
    if p["arterial"]:
        ta, _ = _sampled(t, sbp, 2, rng, start=min(a0 + 300, T))
        for name, arr in (("ART_SBP", sbp), ("ART_DBP", dbp), ("ART_MBP", mbp)):
            add(f"Solar8000/{name}", "mmHg", ta, np.round(arr[ta]))
    tn = np.arange(0, T, 300)
    for name, arr in (("NIBP_SBP", sbp), ("NIBP_DBP", dbp), ("NIBP_MBP", mbp)):
        add(f"Solar8000/{name}", "mmHg", tn, np.round(arr[tn]))
    if p["ev1000"]:
        add("EV1000/ART_MBP", "mmHg", *_sampled(t, np.round(mbp), 2, rng, start=a0))
    add("Solar8000/PLETH_SPO2", "%", *_sampled(t, np.round(spo2), 2, rng))
    add("Solar8000/ETCO2", "mmHg", *_sampled(t, np.round(etco2), 2, rng, start=v0, end=max(v0, v1)))
    if p["bis"]:
        add("BIS/BIS", "", *_sampled(t, np.round(bis, 1), 1, rng, start=max(0, a0 - 300)))

    if p["pumps"]:
        ppf_maint = (6.0 if p["tiva"] else 0.0) * weight / 20.0  # mg/kg/h -> mL/h of 20 mg/mL
        ppf = np.where(t < a0 + 40, 500.0, ppf_maint) * anaes
        ppf = np.round(ppf * (1 + 0.1 * np.sin(t / 900.0)), 1)
        add("Orchestra/PPF20_RATE", "mL/h", *_sampled(t, ppf, 1, rng, start=a0, end=max(a0, a1 - 300), drop=0.0))
        conc = 50.0 if p["rftn50"] else 20.0
        rftn = np.round(0.12 * weight * 60 / conc * anaes * (1 + 0.3 * np.sin(t / 600.0)), 2)
        add(f"Orchestra/RFTN{int(conc)}_RATE", "mL/h", *_sampled(t, rftn, 1, rng, start=a0, end=max(a0, a1 - 200), drop=0.0))
        if p["nepi"]:
            ne = np.round(0.05 * weight * 60 / 20.0 * (1 + 0.5 * np.sin(t / 400.0)), 2)
            tt = np.arange(a0 + 600, max(a0 + 600, a1 - 600))
            # The pump is paused now and then: gaps of 5 s (carried) and 120 s (stopped).
            keep = ((tt // 700) % 3 != 2) | ((tt % 700) >= 120)
            keep &= ~(((tt % 500) >= 250) & ((tt % 500) < 255))
            add("Orchestra/NEPI_RATE", "mL/h", tt[keep], ne[tt[keep]])

    ibw = (50.0 if male else 45.5) + 0.9055 * (height - 152.4)
    tv = np.round(7.0 * ibw + rng.normal(0, 15, T))
    sevo = 0.0 if p["tiva"] else 2.0
    vent = dict(TV=("mL", tv), PEEP_MBAR=("mbar", np.full(T, 5.0)), FIO2=("%", np.full(T, 50.0)),
                RR_CO2=("/min", np.full(T, 12.0)), ETCO2=("mmHg", np.round(etco2)),
                EXP_SEVO=("kPa", np.round(np.full(T, sevo) + rng.normal(0, 0.05, T) * (sevo > 0), 2)),
                INSP_SEVO=("kPa", np.round(np.full(T, sevo * 1.2) + rng.normal(0, 0.05, T) * (sevo > 0), 2)))
    tp, _ = _sampled(t, t, 7, rng, start=v0, end=max(v0, v1))
    for name, (unit, arr) in vent.items():
        add(f"Primus/{name}", unit, tp, arr[tp])
    if p["solar_vent"]:
        ts_, _ = _sampled(t, t, 2, rng, start=v0, end=max(v0, v1))
        add("Solar8000/VENT_TV", "mL", ts_, tv[ts_])
        add("Solar8000/VENT_MEAS_PEEP", "hPa", ts_, np.full(ts_.size, 5.0))
        add("Solar8000/FIO2", "%", ts_, np.full(ts_.size, 50.0))
        add("Solar8000/RR_CO2", "/min", ts_, np.full(ts_.size, 12.0))

    if waveforms:
        _add_waveforms(vf, rng, T, hr)

    row = {
        "caseid": case_id, "subjectid": subject_id(case_id), "casestart": 0, "caseend": T,
        "anestart": a0 - 60, "aneend": a1 + 60, "opstart": a0 + 600, "opend": a1 - 600,
        "age": age, "sex": p["sex"], "height": height, "weight": weight,
        "bmi": round(weight / (height / 100) ** 2, 1), "asa": float(rng.choice([1, 2, 2, 3, 3, 4])),
        "emop": 0, "department": "General surgery", "optype": "Colorectal", "ane_type": "General",
    }
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


def write_sample(output: str, case_ids: list[int], duration_s: Optional[int] = None, waveforms: bool = False,
                 short_case: Optional[int] = None, missing_weight: Optional[int] = None,
                 missing_asa: Optional[int] = None, no_clinical_row: Optional[int] = None,
                 implausible_weight: Optional[int] = None, rename: Optional[dict[str, str]] = None,
                 layout: str = "packed") -> str:
    """Writes <id:04d>.vital files (in `layout`, see LAYOUTS) and
    clinical_data.csv to `output` (any Beam filesystem); returns the
    clinical table's path. Durations vary 40-90 min unless `duration_s` is
    given; `short_case` is shorter than one window; `rename` writes tracks
    under another device's names."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cid in case_ids:
            rng = np.random.default_rng(cid)
            dur = duration_s or int(rng.integers(40, 91) * 60)
            if cid == short_case:
                dur = 240
            vf, row = generate_case(cid, dur, waveforms, rename)
            local = os.path.join(tmp, f"{cid:04d}.vital")
            write_vital(vf, local, layout)
            with open(local, "rb") as fh:
                storage.write_atomic(storage.join(output, f"{cid:04d}.vital"), fh.read())
            os.remove(local)
            if cid == missing_weight:
                row["weight"], row["bmi"] = None, None
            if cid == missing_asa:
                row["asa"] = None
            if cid == implausible_weight:  # an entry error (contract 1.1): treated as missing
                row["weight"], row["bmi"] = IMPLAUSIBLE_WEIGHT_KG, None
            if cid != no_clinical_row:
                rows.append(row)
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    path = storage.join(output, CLINICAL_FILE)  # where a folder's table is looked for
    storage.write_atomic(path, buf.getvalue().encode())
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
                         layout: str = "packed") -> str:
    """The embedded sample: n cases in every split, with every situation a
    user meets (patients with two and three operations, a missing weight, a
    missing ASA, an entry error, a case too short for one window)."""
    ids = sample_case_ids(n, settings)
    return write_sample(output, ids, short_case=ids[-1] if n >= 3 else None,
                        missing_weight=ids[1] if n >= 2 else None, missing_asa=ids[2] if n >= 3 else None,
                        implausible_weight=ids[3] if n >= 5 else None, layout=layout)


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
    args = ap.parse_args(argv)
    if args.hours is None and not args.waveforms:
        path = write_default_sample(args.output, args.cases, layout=args.layout)
    else:
        dur = int(args.hours * 3600) if args.hours else None
        path = write_sample(args.output, list(range(1, args.cases + 1)), dur, args.waveforms, layout=args.layout)
    print(f"wrote {args.cases} cases and {path}")  # the ids: see the clinical table
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
