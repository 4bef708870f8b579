"""Benchmark: how close the pipeline runs to its floors (not a pytest test).

    .venv/bin/python tests/benchmarks/bench.py              # 40 four-hour cases, 5 repeats (~9 min)
    .venv/bin/python tests/benchmarks/bench.py --quick      # 6 one-hour cases, 1 repeat (~2 min)
    .venv/bin/python tests/benchmarks/bench.py --scaling    # also: peak memory of 200 vs 20 cases

Cases are generated once into --workdir (default bench-out/): VitalDB-format
files with the 16 numeric source tracks at their device intervals plus 500 Hz
ECG and PLETH and 62.5 Hz CO2 waveforms with quantised samples, as real files
carry them. Printed, from one invocation (medians of --repeat runs):

* parse floor: seconds per case for the same vitaldb calls and nothing else,
  timed inside the run for each case and, as a check, in separate passes in
  this process just before and after the run (see main() on drift);
* compress floor: seconds per case to compress its framed examples once, with the
  compressor the pipeline uses (libdeflate, level 6: encode.GZIP_LEVEL), as one stream;
* stage 1 / stage 2 seconds per case, steady state, 1 worker, and
  throughput with 2 workers; start-up separately: stage 1's per-case time is
  the span between each worker's first and last commit (markers) over the
  cases in it, start-up the time from launch to the first commit less one
  case; stage 2's per-case time is its shard writing, start-up the rest;
* the seconds per step inside stage 1's DoFns (from the markers) and what
  lies between them (Beam);
* windows per second, compressed bytes per window, peak memory of the whole
  run (main process + stage job + Beam workers, sampled), and the targets;
* remote inputs: loading a case streamed from a stand-in for VitalDB's web
  API and from the S3 emulator (each its own process on loopback), against
  the local parse floor measured in passes between them; and the bytes
  transferred per case against its numeric part (the same case's file
  without its waveform tracks, written the same way) plus 1 MiB.

    .venv/bin/python tests/benchmarks/bench.py --remote-only   # only the remote inputs (~1 min)

* reading an output: pipeline.reader (numpy) against tf.data (TFRecordDataset
  + parse_single_example), examples per second, both on one core.

    .venv/bin/python tests/benchmarks/bench.py --reader-only OUTPUT   # only the reader, on an output
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

import deflate
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pipeline.io import vital as load  # noqa: E402
from pipeline.io.clinical import read_clinical  # noqa: E402
from pipeline.io.sources import Source  # noqa: E402
from pipeline.output import storage  # noqa: E402
from pipeline.tools import sample  # noqa: E402
from transforms import encode, spec, tfrecord  # noqa: E402
from transforms.per_case import Settings, process_case  # noqa: E402

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
    def parse(cid):
        vf = vitaldb.VitalFile(os.path.join(data, f"{cid:04d}.vital"),
                               track_names=list(spec.DEFAULT_SPEC.source_tracks))
        vf.to_numpy([x for x in spec.DEFAULT_SPEC.source_tracks if x in vf.trks], 1)

    try:
        parse(n)  # first call (lazy imports, caches) untimed, as in the pipeline's steady state
        t = time.perf_counter()
        for cid in range(1, n + 1):
            parse(cid)
        return (time.perf_counter() - t) / n
    finally:
        vitaldb.utils.gzip = hooked


def case_examples(data: str, n: int) -> list[bytes]:
    """Each case's serialized examples, framed as TFRecords (computed once)."""
    clinical = read_clinical(os.path.join(data, "clinical_data.csv"))
    out = []
    for cid in range(1, n + 1):
        rc = load.load_case(Source.for_location(data), cid)
        cw = process_case(cid, rc.raw, clinical.row(cid), Settings(), split_key=clinical.split_key(cid))
        out.append(tfrecord.frame_records(encode.encode_examples(cid, cw.starts, cw.example_floats())))
    return out


def compress_floor(framed: list[bytes]) -> float:
    """The pipeline's compressor (libdeflate at encode.GZIP_LEVEL) over each
    case's framed examples once, as one stream."""
    t = time.perf_counter()
    for data in framed:
        deflate.gzip_compress(data, encode.GZIP_LEVEL)
    return (time.perf_counter() - t) / len(framed)


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


def steady_state(done: dict) -> tuple[float, float, float, dict]:
    """From the markers' commit times: (seconds per case of one worker,
    cases per second of all workers together, time of the first commit,
    seconds per case of each step timed inside the DoFns).

    Each worker's cases are timed from its first commit to its last, so a
    worker's start-up and its first case (imports, first calls) are outside
    the figures, the step times included."""
    by_worker: dict = {}
    for m in done.values():
        by_worker.setdefault((m.host, m.worker), []).append(m)
    rates, spans, steady = [], [], []
    for ms in by_worker.values():
        ms.sort(key=lambda m: m.committed)
        if len(ms) >= 2:
            span = ms[-1].committed - ms[0].committed
            rates.append((len(ms) - 1) / span)
            spans.append(span / (len(ms) - 1))
            steady += ms[1:]
    steps = {k: statistics.mean(dict(m.timings.items()).get(k, 0.0) for m in steady)
             for k, _ in steady[0].timings.items()}
    first = min(m.committed for m in done.values())
    return statistics.median(spans), sum(rates), first, steps


def run_pipeline(data: str, out: str, n: int, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [CLI, "--input", data, "--output", out, "--cases", f"1-{n}", f"--direct_num_workers={workers}",
           "--progress-interval", "3600"]
    launched = time.time()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    log = proc.communicate()[0]
    mem.stop()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{log[-3000:]}")
    meta = json.load(open(os.path.join(out, "preprocessing_metadata.json")))
    done = storage.read_done(out)
    per_case, rate, first, steps = steady_state(done)
    files = [os.path.join(out, s, f) for s in spec.SPLIT_NAMES if os.path.isdir(os.path.join(out, s))
             for f in os.listdir(os.path.join(out, s))]
    tm = meta["timings"]
    return {"wall": wall, **tm, "rss": mem.rss, "pss": mem.pss, "n": n,
            "s1_case": per_case, "s1_rate": rate,
            # launch to the first commit, less the first case itself
            "s1_startup": first - launched - per_case,
            "s2_case": tm["stage2_shard_write_s"] / n, "s2_startup": tm["stage2_s"] - tm["stage2_shard_write_s"],
            "verify_case": tm["verify_s"] / n,
            "steps": steps,
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


def numeric_part(path: str, tmp: str) -> int:
    """Bytes of a case's file without its waveform tracks, written as the
    generator writes (packed, gzip level 6): the part a reader that wants
    only numeric tracks has to transfer."""
    import vitaldb
    vf = vitaldb.VitalFile(path)
    vf.remove_tracks([name for name, t in vf.trks.items() if t.type == 1])
    sample.write_vital(vf, tmp)
    return os.path.getsize(tmp)


def _serve(cmd: list[str], ready_url: str) -> subprocess.Popen:
    import urllib.request
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(ready_url, timeout=1).close()
            return proc
        except OSError as e:
            if getattr(e, "code", None):  # an HTTP error: the server answers
                return proc
            proc.poll()
            if proc.returncode is not None:
                raise SystemExit(f"{cmd[0]} did not start")
            time.sleep(0.1)  # waiting for a server process to listen
    raise SystemExit(f"{cmd} did not start")


def remote_inputs(workdir: str, data: str, n: int, repeat: int) -> tuple[list, list]:
    """Loading cases streamed from the web API stand-in and the S3 emulator,
    each in its own process, against the local parse floor in passes
    between them; the transfer per case against its numeric part."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from s3util import KEY, REGION, SECRET, boto_client, free_port, upload_dir

    from pipeline.io import remote
    web_port, s3_port = free_port(), free_port()
    py = sys.executable
    web = _serve([py, os.path.join(ROOT, "tests", "webstandin.py"), "--root", data, "--port", str(web_port)],
                 f"http://127.0.0.1:{web_port}/cases")
    moto = _serve([os.path.join(os.path.dirname(py), "moto_server"), "-p", str(s3_port)],
                  f"http://127.0.0.1:{s3_port}/")
    try:
        s3_url = f"http://127.0.0.1:{s3_port}"
        os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION)
        client = boto_client(s3_url)
        client.create_bucket(Bucket="bench-remote")
        s3_prefix = upload_dir(client, data, "bench-remote", "raw")
        FileSystems.set_options(PipelineOptions([f"--s3_endpoint_url={s3_url}", f"--s3_region_name={REGION}"]))
        sources = {"web": Source.for_location(f"http://127.0.0.1:{web_port}/1.0.1"),
                   "s3": Source.for_location(s3_prefix)}
        numeric = {cid: numeric_part(os.path.join(data, f"{cid:04d}.vital"), os.path.join(workdir, "numeric.vital"))
                   for cid in range(1, n + 1)}
        for src in sources.values():  # first calls (connections, clients) untimed
            load.load_case(src, 1)
        rows, transfers = [], []
        for _ in range(repeat):
            floors = [parse_floor(data, n)]
            loads = {}
            for name, src in sources.items():
                t = time.perf_counter()
                cases = [load.load_case(src, cid) for cid in range(1, n + 1)]
                loads[name] = (time.perf_counter() - t) / n
                transfers += [(name, c.case_id, c.input.bytes_read, numeric[c.case_id], c.input.bytes)
                              for c in cases]
                floors.append(parse_floor(data, n))
            rows.append({"floor": statistics.mean(floors), **loads})
        remote.forget_connections()
        return rows, transfers
    finally:
        for p in (web, moto):
            p.terminate()
            p.wait()


def remote_report(rows: list, transfers: list) -> tuple[list, list]:
    floor = statistics.median(r["floor"] for r in rows)
    lines, targets = [("parse floor, local (remote passes)", f"{floor:.3f} s/case")], []
    for name in ("web", "s3"):
        load_s = statistics.median(r[name] for r in rows)
        ratio = statistics.median(r[name] / r["floor"] for r in rows)
        mine = [t for t in transfers if t[0] == name]
        read, num, size = (sum(t[i] for t in mine) / len(mine) for i in (2, 3, 4))
        worst = max(t[2] - t[3] for t in mine)
        lines.append((f"load from {'the web API stand-in' if name == 'web' else 'the S3 emulator'}",
                      f"{load_s:.3f} s/case; read {read / 1e6:.2f} MB of {size / 1e6:.1f} MB per case "
                      f"(numeric part {num / 1e6:.2f} MB)"))
        targets.append((f"{name}: load / local parse floor <= 1.3", ratio, None, 1.3))
        targets.append((f"{name}: bytes read - numeric part <= 1 MiB (worst case, MiB)", worst / 2**20, None, 1.0))
    return lines, targets


def reader_speed(output: str, repeat: int = 3) -> tuple[list, list]:
    """Examples per second over the output's files, pipeline.reader and
    tf.data, in a child process pinned to one core (TensorFlow's thread
    pools too); and how many of the batched read's records the reader
    decoded by its fast path (the layout of this product's examples)."""
    code = r"""
import json, os, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
out, repeat = sys.argv[1], int(sys.argv[2])
from pipeline.reader import OutputReader
meta = json.load(open(f"{out}/preprocessing_metadata.json"))
split = max(meta["splits"], key=lambda s: meta["splits"][s]["windows"])
def ours():
    return sum(1 for _ in OutputReader(out, split))
decoded = {}
def ours_batched():
    r = OutputReader(out, split, batch_size=256)
    n = sum(len(b["case_id"]) for b in r)
    decoded.update(r.decoded)
    return n
import tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
r = OutputReader(out, split)
feats = {n: tf.io.FixedLenFeature([f["length"]], tf.float32 if f["type"] == "float" else tf.int64)
         for n, f in meta["format"]["features"].items()}
def theirs():
    ds = tf.data.TFRecordDataset(r.files, compression_type="GZIP").map(
        lambda x: tf.io.parse_single_example(x, feats), num_parallel_calls=1)
    return sum(1 for _ in ds.as_numpy_iterator())
def theirs_batched():
    ds = tf.data.TFRecordDataset(r.files, compression_type="GZIP").batch(256).map(
        lambda x: tf.io.parse_example(x, feats), num_parallel_calls=1)
    return sum(len(b["case_id"]) for b in ds.as_numpy_iterator())
res = {}
for name, f in (("reader", ours), ("tf.data", theirs), ("reader batched", ours_batched),
                ("tf.data batched", theirs_batched)):
    f()
    best = []
    for _ in range(repeat):
        t = time.perf_counter(); n = f(); best.append(n / (time.perf_counter() - t))
    res[name] = (n, max(best))
res["decoded"] = decoded
print(json.dumps(res))
"""
    res = subprocess.run([sys.executable, "-c", code, output, str(repeat)], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    speeds = json.loads(res.stdout.strip().splitlines()[-1])
    (n, ours), (_, theirs) = speeds["reader"], speeds["tf.data"]
    ours_b, theirs_b = speeds["reader batched"][1], speeds["tf.data batched"][1]
    fast = speeds["decoded"]["layout"]
    rows = [("reader, one core", f"{ours:,.0f} examples/s (pipeline.reader, numpy); tf.data {theirs:,.0f} "
                                 f"(parse_single_example); {n} examples"),
            ("  batches of 256", f"{ours_b:,.0f} examples/s; tf.data {theirs_b:,.0f} (batch, then parse_example); "
                                 f"{fast} of {n} records by the reader's fast path")]
    return rows, [("reader / tf.data examples per second (one core)", ours / theirs, None, None),
                  ("reader / tf.data, batches of 256", ours_b / theirs_b, None, None)]


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--hours", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="6 one-hour cases, 1 repeat")
    ap.add_argument("--scaling", action="store_true", help="also compare peak memory of 200 and 20 cases")
    ap.add_argument("--scaling-only", action="store_true", help="only the 200 vs 20 cases memory comparison")
    ap.add_argument("--remote-only", action="store_true", help="only the remote inputs (web API and S3)")
    ap.add_argument("--reader-only", metavar="OUTPUT", help="only the reader against tf.data, on this output")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "bench-out"))
    args = ap.parse_args()
    if args.quick:
        args.cases, args.hours, args.repeat = 6, 1.0, 1
    N = args.cases
    data = generate(args.workdir, N, args.hours)
    out = os.path.join(args.workdir, "out")

    if args.reader_only:
        lines, targets = reader_speed(args.reader_only)
        return print_results(lines, targets)
    if args.remote_only:
        lines, targets = remote_report(*remote_inputs(args.workdir, data, N, args.repeat))
        return print_results(lines, targets)
    if args.scaling_only:
        m20, m200 = memory_scaling(args.workdir, data, out, N)
        print(f"peak memory 20 vs 200 cases: PSS {m20['pss'] / 2**20:.0f} vs {m200['pss'] / 2**20:.0f} MiB, "
              f"RSS sum {m20['rss'] / 2**20:.0f} vs {m200['rss'] / 2**20:.0f} MiB")
        ratio = m200["pss"] / m20["pss"]
        print(f"{'PASS' if ratio <= 1.15 else 'FAIL'}  200-case / 20-case peak memory <= 1.15: {ratio:.2f}")
        return 0 if ratio <= 1.15 else 1
    # This machine's speed drifts by tens of percent over seconds to minutes
    # (the same parse of the same file: 0.37-0.73 s back to back), so a floor
    # measured at another moment than the run lands on one side of a ratio.
    # Two measures of the parse floor, both printed:
    # * "in the run": the pipeline times the very same vitaldb calls (nothing
    #   else inside the timed region) for each case as it goes, so the floor
    #   and the run see the same machine; the targets are judged on it;
    # * "separate passes": the calls alone in this process, just before and
    #   just after the 1-worker run (their mean), ratios taken per repeat.
    framed = case_examples(data, N)
    reps = []
    for r in range(args.repeat):
        pf_before = parse_floor(data, N)
        one = run_pipeline(data, out, N, 1)
        pf_after = parse_floor(data, N)
        two = run_pipeline(data, out, N, 2)  # right after: the 2-worker / 1-worker ratio is taken per repeat
        cf = compress_floor(framed)
        pf = (pf_before + pf_after) / 2
        reps.append({"pf": pf, "pf_run": one["steps"]["parse"], "cf": cf, "one": one, "two": two,
                     "per_case": one["s1_case"] + one["s2_case"]})
        print(f"repeat {r + 1}: parse floor {pf_before:.3f} / {one['steps']['parse']:.3f} in the run / {pf_after:.3f}, "
              f"compress floor {cf:.3f}, stage 1 {one['s1_case']:.3f} + stage 2 {one['s2_case']:.3f} s/case; "
              f"2 workers {two['s1_rate'] * 60:.1f} cases/min ({two['s1_rate'] * one['s1_case']:.2f} x 1 worker)",
              flush=True)

    def m(f):
        return statistics.median(f(x) for x in reps)

    pf, pf_run, cf = m(lambda x: x["pf"]), m(lambda x: x["pf_run"]), m(lambda x: x["cf"])
    s1, s2, v = m(lambda x: x["one"]["s1_case"]), m(lambda x: x["one"]["s2_case"]), m(lambda x: x["one"]["verify_case"])
    thr1, thr2 = m(lambda x: 1 / x["one"]["s1_case"]), m(lambda x: x["two"]["s1_rate"])
    per_case_1 = s1 + s2
    windows_per_case = reps[0]["one"]["windows"] / N
    peak_rss = max(x[k]["rss"] for x in reps for k in ("one", "two"))
    peak_pss = max(x[k]["pss"] for x in reps for k in ("one", "two"))
    steps = {k: m(lambda x, k=k: x["one"]["steps"].get(k, 0.0)) for k in reps[0]["one"]["steps"]}
    inside = sum(v_ for k, v_ in steps.items() if k != "parse")  # parse is part of load
    rows = [
        ("cases x length", f"{N} x {args.hours:g} h, {windows_per_case:.0f} windows/case, {args.repeat} repeat(s)"),
        ("parse floor", f"{pf_run:.3f} s/case timed in the run; {pf:.3f} in separate passes"),
        (f"compress floor (libdeflate {encode.GZIP_LEVEL})",
         f"{cf:.3f} s/case ({sum(map(len, framed)) / N / 1e6:.1f} MB of examples/case)"),
        ("stage 1, 1 worker", f"{s1:.3f} s/case steady state (start-up {m(lambda x: x['one']['s1_startup']):.1f} s)"),
        ("  in the DoFns", "  ".join(f"{k} {v_:.3f}" for k, v_ in steps.items()) + " s/case"),
        ("  between them (Beam)", f"{s1 - inside:.3f} s/case"),
        ("stage 2, 1 worker", f"{s2:.3f} s/case (start-up {m(lambda x: x['one']['s2_startup']):.1f} s)"),
        ("verify (read back)", f"{v:.3f} s/case (not in the targets: a check after stage 2)"),
        ("metadata + report", f"{m(lambda x: x['one']['metadata_report_s']):.1f} s per run (fixed)"),
        ("stage 1 throughput", f"1 worker {thr1 * 60:.1f} cases/min, 2 workers {thr2 * 60:.1f} cases/min "
                               f"(start-up {m(lambda x: x['two']['s1_startup']):.1f} s)"),
        ("windows per second", f"{windows_per_case / per_case_1:.0f} (1 worker, stages 1+2)"),
        ("compressed bytes/window", f"{reps[0]['one']['bytes'] / reps[0]['one']['windows']:.0f}"),
        ("peak memory, whole run", f"RSS sum {peak_rss / 2**20:.0f} MiB, PSS {peak_pss / 2**20:.0f} MiB"),
    ]
    def ratios(f):  # (in the run, separate passes)
        return m(lambda x: f(x, x["pf_run"])), m(lambda x: f(x, x["pf"]))

    targets = [
        ("(stage1+stage2) / parse floor <= 1.3", *ratios(lambda x, p: x["per_case"] / p), 1.3),
        ("non-parse / compress floor <= 2.5", *ratios(lambda x, p: (x["per_case"] - p) / x["cf"]), 2.5),
        ("2-worker / 1-worker throughput >= 1.7", m(lambda x: x["two"]["s1_rate"] * x["one"]["s1_case"]), None, None),
        ("peak memory (PSS) <= 1.5 GB", peak_pss / 1e9, None, 1.5),
    ]
    if args.scaling:
        m20, m200 = memory_scaling(args.workdir, data, out, N)
        rows.append(("peak memory 20 vs 200 cases", f"PSS {m20['pss'] / 2**20:.0f} vs {m200['pss'] / 2**20:.0f} MiB"))
        targets.append(("200-case / 20-case peak memory <= 1.15", m200["pss"] / m20["pss"], None, 1.15))
    lines, remote_targets = remote_report(*remote_inputs(args.workdir, data, N, args.repeat))
    run_pipeline(data, out, N, 1)
    reader_lines, reader_targets = reader_speed(out)
    return print_results(rows + lines + reader_lines, targets + remote_targets + reader_targets)


def print_results(rows: list, targets: list) -> int:
    print()
    w = max(len(r[0]) for r in rows)
    for k, val in rows:
        print(f"{k.ljust(w)}  {val}")
    print()
    ok = True
    for name, value, separate, limit in targets:
        if name.startswith("reader"):  # a figure, not a target
            print(f"      {name}: {value:.2f}")
            continue
        good = value >= 1.7 if limit is None else value <= limit
        ok &= good
        extra = "" if separate is None else f"  (parse floor of separate passes: {separate:.2f})"
        print(f"{'PASS' if good else 'FAIL'}  {name}: {value:.2f}{extra}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
