"""Benchmark: how close the pipeline runs to its floors (not a pytest test).

    .venv/bin/python tests/benchmarks/bench.py              # 40 four-hour cases, 3 repeats (~15 min)
    .venv/bin/python tests/benchmarks/bench.py --quick      # 6 one-hour cases, 1 repeat (~2 min)
    .venv/bin/python tests/benchmarks/bench.py --scaling    # also: peak memory of 200 vs 20 cases

Cases are generated once into --workdir (default bench-out/): VitalDB-format
files with the 16 numeric source tracks at their device intervals plus 500 Hz
ECG and PLETH and 62.5 Hz CO2 waveforms with quantised samples, as real files
carry them. Printed, from one invocation (medians of --repeat runs):

* parse floor: seconds per case for the same vitaldb calls and nothing else;
* compress floor: seconds per case to zlib-compress (level 6) its serialized examples once;
* stage 1 / stage 2 (+ verify) seconds per case, steady state, 1 worker, and
  throughput with 2 workers; worker start-up separately: per-case cost is the
  slope between a run of N cases and a run of 2, start-up the intercept;
* windows per second, compressed bytes per window, peak memory of the whole
  run (main process + stage job + Beam workers, sampled), and the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pipeline import sample  # noqa: E402
from transforms import encode, load, spec  # noqa: E402
from transforms.case import Settings, process_case  # noqa: E402

CLI = os.path.join(os.path.dirname(sys.executable), "master-poc-preprocess")


def generate(workdir: str, n: int, hours: float) -> str:
    data = os.path.join(workdir, f"data-{n}x{hours:g}h")
    marker = os.path.join(data, ".complete")
    if not os.path.exists(marker):
        shutil.rmtree(data, ignore_errors=True)
        t = time.time()
        sample.write_sample(data, list(range(1, n + 1)), int(hours * 3600), waveforms=True)
        open(marker, "w").close()
        print(f"generated {n} cases of {hours:g} h in {time.time() - t:.0f} s -> {data}")
    return data


def parse_floor(data: str, n: int) -> float:
    """The same vitaldb calls as the loader, with vitaldb's own gzip module
    (the loader installs a reader that notices truncation)."""
    import gzip

    import vitaldb
    hooked, vitaldb.utils.gzip = vitaldb.utils.gzip, gzip
    try:
        t = time.perf_counter()
        for cid in range(1, n + 1):
            vf = vitaldb.VitalFile(os.path.join(data, f"{cid:04d}.vital"), track_names=list(spec.SOURCE_TRACKS))
            vf.to_numpy([x for x in spec.SOURCE_TRACKS if x in vf.trks], 1)
        return (time.perf_counter() - t) / n
    finally:
        vitaldb.utils.gzip = hooked


def compress_floor(data: str, n: int) -> tuple[float, int]:
    clinical = load.read_clinical(os.path.join(data, "clinical_data.csv"))
    total, nbytes = 0.0, 0
    for cid in range(1, n + 1):
        rc = load.load_case(data, cid)
        cw = process_case(cid, rc.raw, clinical.get(cid), Settings())
        framed = encode.frame_records(encode.encode_examples(cid, cw.starts, cw.timeseries, cw.static, cw.targets))
        t = time.perf_counter()
        zlib.compress(framed, 6)
        total += time.perf_counter() - t
        nbytes += len(framed)
    return total / n, nbytes


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            for p in procs:
                try:
                    mi = p.memory_full_info()
                    rss += mi.rss
                    pss += getattr(mi, "pss", mi.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._t.join()


def run_pipeline(data: str, out: str, n: int, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [CLI, "--input", data, "--output", out, "--cases", f"1-{n}", f"--direct_num_workers={workers}",
           "--progress-interval", "3600"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    log = proc.communicate()[0]
    mem.stop()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{log[-3000:]}")
    meta = json.load(open(os.path.join(out, "preprocessing_metadata.json")))
    files = [os.path.join(out, s, f) for s in spec.SPLIT_NAMES if os.path.isdir(os.path.join(out, s))
             for f in os.listdir(os.path.join(out, s))]
    return {"wall": wall, **meta["timings"], "rss": mem.rss, "pss": mem.pss,
            "windows": sum(meta["splits"][s]["windows"] for s in spec.SPLIT_NAMES),
            "bytes": sum(os.path.getsize(f) for f in files)}


def memory_scaling(workdir: str, data: str, out: str, n: int) -> tuple[dict, dict]:
    """Peak memory of 20 and 200 cases (hard links to the generated files)."""
    import pandas as pd
    big = os.path.join(workdir, "data-scaling")
    if not os.path.exists(os.path.join(big, ".complete")):
        shutil.rmtree(big, ignore_errors=True)
        os.makedirs(big)
        clinical = pd.read_csv(os.path.join(data, "clinical_data.csv"))
        rows = []
        for cid in range(1, 201):
            src = (cid - 1) % n + 1
            os.link(os.path.join(data, f"{src:04d}.vital"), os.path.join(big, f"{cid:04d}.vital"))
            r = clinical[clinical.caseid == src].copy()
            r["caseid"] = cid
            rows.append(r)
        pd.concat(rows).to_csv(os.path.join(big, "clinical_data.csv"), index=False)
        open(os.path.join(big, ".complete"), "w").close()
    return run_pipeline(big, out, 20, 2), run_pipeline(big, out, 200, 2)


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--hours", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="6 one-hour cases, 1 repeat")
    ap.add_argument("--scaling", action="store_true", help="also compare peak memory of 200 and 20 cases")
    ap.add_argument("--scaling-only", action="store_true", help="only the 200 vs 20 cases memory comparison")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "bench-out"))
    args = ap.parse_args()
    if args.quick:
        args.cases, args.hours, args.repeat = 6, 1.0, 1
    N, small = args.cases, 2
    data = generate(args.workdir, N, args.hours)
    out = os.path.join(args.workdir, "out")

    if args.scaling_only:
        m20, m200 = memory_scaling(args.workdir, data, out, N)
        print(f"peak memory 20 vs 200 cases: PSS {m20['pss'] / 2**20:.0f} vs {m200['pss'] / 2**20:.0f} MiB, "
              f"RSS sum {m20['rss'] / 2**20:.0f} vs {m200['rss'] / 2**20:.0f} MiB")
        ratio = m200["pss"] / m20["pss"]
        print(f"{'PASS' if ratio <= 1.15 else 'FAIL'}  200-case / 20-case peak memory <= 1.15: {ratio:.2f}")
        return 0 if ratio <= 1.15 else 1
    pf = statistics.median(parse_floor(data, N) for _ in range(args.repeat))
    cf_runs = [compress_floor(data, N) for _ in range(args.repeat)]
    cf = statistics.median(r[0] for r in cf_runs)
    runs = {(w, n): [run_pipeline(data, out, n, w) for _ in range(args.repeat)] for w in (1, 2) for n in (small, N)}

    def slope(w, key):
        return (med(runs[(w, N)], key) - med(runs[(w, small)], key)) / (N - small)

    def intercept(w, key):
        return med(runs[(w, small)], key) - small * slope(w, key)

    s1, s2, v = slope(1, "stage1_s"), slope(1, "stage2_s"), slope(1, "verify_s")
    per_case_1 = s1 + s2 + v
    thr1 = 1 / s1
    thr2 = 1 / slope(2, "stage1_s")
    windows_per_case = med(runs[(1, N)], "windows") / N
    peak_rss = max(r["rss"] for rs in runs.values() for r in rs)
    peak_pss = max(r["pss"] for rs in runs.values() for r in rs)
    rows = [
        ("cases x length", f"{N} x {args.hours:g} h, {windows_per_case:.0f} windows/case, {args.repeat} repeat(s)"),
        ("parse floor", f"{pf:.3f} s/case"),
        ("compress floor (zlib 6)", f"{cf:.3f} s/case ({cf_runs[0][1] / N / 1e6:.1f} MB of examples/case)"),
        ("stage 1, 1 worker", f"{s1:.3f} s/case (start-up {intercept(1, 'stage1_s'):.1f} s)"),
        ("stage 2, 1 worker", f"{s2:.3f} s/case (start-up {intercept(1, 'stage2_s'):.1f} s)"),
        ("verify (read back)", f"{v:.3f} s/case"),
        ("metadata + report", f"{med(runs[(1, N)], 'metadata_report_s'):.1f} s per run (fixed)"),
        ("stage 1 throughput", f"1 worker {thr1 * 60:.1f} cases/min, 2 workers {thr2 * 60:.1f} cases/min "
                               f"(start-up {intercept(2, 'stage1_s'):.1f} s)"),
        ("windows per second", f"{windows_per_case / per_case_1:.0f} (1 worker, stages 1+2+verify)"),
        ("compressed bytes/window", f"{med(runs[(1, N)], 'bytes') / med(runs[(1, N)], 'windows'):.0f}"),
        ("peak memory, whole run", f"RSS sum {peak_rss / 2**20:.0f} MiB, PSS {peak_pss / 2**20:.0f} MiB"),
    ]
    targets = [
        ("(stage1+stage2) / parse floor <= 1.5", per_case_1 / pf, 1.5),
        ("non-parse / compress floor <= 2.5", (per_case_1 - pf) / cf, 2.5),
        ("2-worker / 1-worker throughput >= 1.7", thr2 / thr1, None),
        ("peak memory (PSS) <= 1.5 GB", peak_pss / 1e9, 1.5),
    ]
    if args.scaling:
        m20, m200 = memory_scaling(args.workdir, data, out, N)
        rows.append(("peak memory 20 vs 200 cases", f"PSS {m20['pss'] / 2**20:.0f} vs {m200['pss'] / 2**20:.0f} MiB"))
        targets.append(("200-case / 20-case peak memory <= 1.15", m200["pss"] / m20["pss"], 1.15))
    print()
    w = max(len(r[0]) for r in rows)
    for k, val in rows:
        print(f"{k.ljust(w)}  {val}")
    print()
    ok = True
    for name, value, limit in targets:
        good = value >= 1.7 if limit is None else value <= limit
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}  {name}: {value:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
