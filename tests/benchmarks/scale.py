"""Mission scale: N cases on H simulated SageMaker hosts against an S3 emulator.

    .venv/bin/python tests/benchmarks/scale.py                         # 3000 half-hour cases, 6 hosts
    .venv/bin/python tests/benchmarks/scale.py --cases 300 --hosts 3   # a quicker look

Each host is what SageMaker runs: the bundled runner's own entry point
(`master-poc-sagemaker train`) in its own process tree, with its own
/opt/ml/input/config (hyperparameters.json, resourceconfig.json as
algo-1..algo-H), all sharing one output on moto's S3 server (started here,
on loopback). Cases are generated once into --workdir (default bench-out/)
and uploaded to the emulator. Printed: wall time, each host's stage 1 time
(start to its share committed), the leader's wait and finalize (stage 2 +
verification + metadata), the peak memory of all host processes together
(RSS summed and PSS, sampled every 0.5 s), and the metadata's status.
A benchmark, not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from s3util import boto_client, free_port, s3_env, upload_dir  # noqa: E402

from pipeline.tools import sample  # noqa: E402

SM = os.path.join(os.path.dirname(sys.executable), "master-poc-sagemaker")


def generate(workdir: str, n: int, minutes: int) -> str:
    data = os.path.join(workdir, f"scale-{n}x{minutes}min")
    if not os.path.exists(os.path.join(data, ".complete")):
        shutil.rmtree(data, ignore_errors=True)
        t = time.time()
        sample.write_sample(data, list(range(1, n + 1)), minutes * 60)
        open(os.path.join(data, ".complete"), "w").close()
        print(f"generated {n} cases of {minutes} min in {time.time() - t:.0f} s -> {data}", flush=True)
    return data


class Sampler(threading.Thread):
    """Peak memory of every process under the given roots, summed."""

    def __init__(self, roots: list[int], interval: float = 0.5):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.peak_rss = self.peak_pss = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            rss = pss = 0
            for pid in self.roots:
                try:
                    p = psutil.Process(pid)
                    procs = [p] + p.children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for q in procs:
                    try:
                        m = q.memory_full_info()
                        rss, pss = rss + m.rss, pss + getattr(m, "pss", m.rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.stop.wait(self.interval)


def host_root(base: str, host: str, hosts: list[str], hp: dict) -> str:
    root = os.path.join(base, host)
    os.makedirs(os.path.join(root, "input", "config"))
    with open(os.path.join(root, "input/config/hyperparameters.json"), "w") as fh:
        json.dump({k: str(v) for k, v in hp.items()}, fh)
    with open(os.path.join(root, "input/config/resourceconfig.json"), "w") as fh:
        json.dump({"current_host": host, "hosts": hosts, "network_interface_name": "eth0"}, fh)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--hosts", type=int, default=6)
    ap.add_argument("--minutes", type=int, default=30, help="length of every case")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "bench-out"))
    args = ap.parse_args(argv)
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(s3_env())
    data = generate(args.workdir, args.cases, args.minutes)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto_client(endpoint)
        client.create_bucket(Bucket="scale")
        t = time.time()
        src = upload_dir(client, data, "scale", "vital")
        print(f"uploaded {args.cases} cases to the emulator in {time.time() - t:.0f} s", flush=True)
        hosts = [f"algo-{i}" for i in range(1, args.hosts + 1)]
        hp = {"cases": f"1-{args.cases}", "input": src, "output": "s3://scale/out", "leader_wait_s": 7200,
              "poll_s": 2, "progress_interval": 60}
        base = tempfile.mkdtemp(prefix="master-poc-scale-")
        env = dict(os.environ, AWS_ENDPOINT_URL_S3=endpoint)
        marks: dict[str, dict[str, float]] = {h: {} for h in hosts}
        logs: dict[str, list[str]] = {h: [] for h in hosts}

        def follow(host, proc, t0):
            for line in proc.stdout:
                logs[host].append(line)
                now = time.time() - t0
                if line.startswith(("stage 1 done", "leader: waiting", "stage 2: writing")):
                    marks[host].setdefault("stage1", now)
                if line.startswith("stage 2: writing"):
                    marks[host]["finalize_start"] = now
            marks[host]["end"] = time.time() - t0

        t0 = time.time()
        procs = {h: subprocess.Popen([SM, "train"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(env, MASTER_POC_SM_ROOT=host_root(base, h, hosts, hp)))
                 for h in hosts}
        sampler = Sampler([p.pid for p in procs.values()])
        sampler.start()
        readers = [threading.Thread(target=follow, args=(h, p, t0), daemon=True) for h, p in procs.items()]
        for r in readers:
            r.start()
        codes = {h: p.wait() for h, p in procs.items()}
        for r in readers:
            r.join()
        wall = time.time() - t0
        sampler.stop.set()
        sampler.join()
        meta = json.loads(client.get_object(Bucket="scale", Key="out/preprocessing_metadata.json")["Body"].read())
        print(f"\n{args.cases} cases of {args.minutes} min on {args.hosts} simulated hosts "
              f"({os.cpu_count()} cores here, each host uses them all)")
        print(f"  wall time: {wall:.1f} s ({args.cases / wall:.1f} cases/s)")
        for h in hosts:
            m = marks[h]
            print(f"  {h}: exit {codes[h]}, stage 1 {m.get('stage1', float('nan')):.1f} s"
                  + (f", finalize (stage 2 + verify + metadata) {m['end'] - m['finalize_start']:.1f} s"
                     if "finalize_start" in m else ""))
        leader = marks[hosts[0]]
        if "finalize_start" in leader:
            print(f"  leader waited {leader['finalize_start'] - leader.get('stage1', 0):.1f} s for the other hosts")
        t = meta.get("timings", {})
        print(f"  leader's metadata timings: stage 2 {t.get('stage2_s')} s, verification {t.get('verify_s')} s, "
              f"metadata + report {t.get('metadata_report_s')} s")
        print(f"  peak memory, all host processes together: RSS {sampler.peak_rss / 2**30:.2f} GiB, "
              f"PSS {sampler.peak_pss / 2**30:.2f} GiB")
        c = meta["cases"]
        print(f"  metadata: status {meta['status']}, verification {'ok' if meta['verification']['ok'] else 'FAILED'}, "
              f"{len(c['ok'])} ok, {len(c['too_short'])} too short, {len(c['failed'])} failed, "
              f"{sum(meta['splits'][s]['windows'] for s in meta['splits'])} windows in "
              f"{sum(len(meta['splits'][s]['files']) for s in meta['splits'])} files")
        if any(codes.values()):
            for h, code in codes.items():
                if code:
                    print(f"--- {h} (exit {code}) last lines:\n" + "".join(logs[h][-20:]))
            return 1
        shutil.rmtree(base, ignore_errors=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
