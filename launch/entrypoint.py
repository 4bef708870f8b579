"""SageMaker bundled runner: the container's entry point (`docker run IMAGE train`).

Reads SageMaker's configuration the way SageMaker provides it:
`<root>/input/config/hyperparameters.json` and `resourceconfig.json` (root
/opt/ml, or $MASTER_POC_SM_ROOT for tests), with the SM_HOSTS /
SM_CURRENT_HOST / SM_HPS environment variables as fallback. Each host takes
the cases whose position in the requested list is congruent to its host
index modulo the host count and runs stage 1 on them (FnApiRunner,
multi_processing, one worker per vCPU), committing to the shared S3 output.
The first host then waits, bounded by `leader_wait_s`, until every requested
case has a marker, and runs stage 2 and verification. Progress goes to stdout
(CloudWatch); a failure reason goes to <root>/output/failure, which SageMaker
shows in the job description. A spot restart simply reruns: committed cases
are skipped.

Hyperparameters (strings, as SageMaker passes them): cases, input, output,
clinical, window, step, horizon, split, split_seed, num_shards,
min_success_rate, crop_anaesthesia, emit_mask, leader_wait_s (default 3600),
poll_s (default 30), shutdown_grace, progress_interval, beam_args (extra Beam
flags, one string).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from typing import Optional

from pipeline import cli, storage
from transforms.cases import CaseSpecError, parse_cases

# Hyperparameters that become CLI flags. The data settings are fixed by the
# output once stage 1 wrote it, so finalize takes only the operational ones.
DATA_FLAGS = ("window", "step", "horizon", "split", "split_seed")
RUN_FLAGS = ("num_shards", "shutdown_grace", "progress_interval")
BOOL_FLAGS = ("crop_anaesthesia", "emit_mask")


class ConfigError(Exception):
    pass


def sm_root() -> str:
    return os.environ.get("MASTER_POC_SM_ROOT", "/opt/ml")


def _load_json(path: str) -> Optional[dict]:
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    return None


def _value(v):
    """SageMaker passes hyperparameters as strings; JSON-encoded ones are decoded."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def read_config(root: str) -> tuple[dict, str, list[str]]:
    hp = _load_json(os.path.join(root, "input/config/hyperparameters.json"))
    if hp is None:
        hp = json.loads(os.environ.get("SM_HPS", "{}"))
    hp = {k: _value(v) for k, v in hp.items()}
    rc = _load_json(os.path.join(root, "input/config/resourceconfig.json"))
    if rc is not None:
        current, hosts = rc["current_host"], list(rc["hosts"])
    else:
        current = os.environ.get("SM_CURRENT_HOST", "algo-1")
        hosts = json.loads(os.environ.get("SM_HOSTS", json.dumps([current])))
    if current not in hosts:
        raise ConfigError(f"current host {current!r} is not among the hosts {hosts}")
    for key in ("cases", "input", "output"):
        if not hp.get(key):
            raise ConfigError(f"hyperparameter {key!r} is missing")
    return hp, current, sorted(hosts)


def host_share(case_ids: list[int], index: int, count: int) -> list[int]:
    """This host's cases: positions congruent to its index modulo the host count."""
    return [c for i, c in enumerate(case_ids) if i % count == index]


def write_failure(root: str, reason: str) -> None:
    os.makedirs(os.path.join(root, "output"), exist_ok=True)
    with open(os.path.join(root, "output/failure"), "w") as fh:
        fh.write(reason[:1000])
    print(f"FAILED: {reason}", flush=True)


def _flags(hp: dict, keys=DATA_FLAGS + RUN_FLAGS, bools=BOOL_FLAGS) -> list[str]:
    """CLI flags for the given hyperparameters, plus the extra Beam flags."""
    out = []
    for k in keys:
        if hp.get(k) not in (None, ""):
            v = hp[k]
            out += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    for k in bools:
        if str(hp.get(k, "")).lower() in ("1", "true", "yes"):
            out.append(f"--{k.replace('_', '-')}")
    return out + shlex.split(str(hp.get("beam_args") or ""))


def main(argv: Optional[list[str]] = None) -> int:
    root = sm_root()
    try:
        hp, current, hosts = read_config(root)
        case_ids = parse_cases(str(hp["cases"]))
    except (ConfigError, CaseSpecError, KeyError, ValueError) as e:
        write_failure(root, f"bad job configuration: {e}")
        return 2
    index, count = hosts.index(current), len(hosts)
    os.environ["MASTER_POC_HOST"] = current
    share = host_share(case_ids, index, count)
    output = str(hp["output"])
    print(f"host {current} ({index + 1} of {count}): {len(share)} of {len(case_ids)} cases, "
          f"{os.cpu_count()} vCPUs", flush=True)
    common = _flags(hp)
    io_flags = ["--input", str(hp["input"]), "--output", output]
    if hp.get("clinical"):
        io_flags += ["--clinical", str(hp["clinical"])]
    if share:
        rc = cli.main(["--cases", ",".join(map(str, share)), "--no-finalize", "--min-success-rate", "0",
                       f"--direct_num_workers={os.cpu_count() or 1}"] + io_flags + common)
        if rc == cli.EXIT_INTERRUPTED:
            print("stopped by a signal: committed cases are kept; a restart continues", flush=True)
            return rc
        if rc != 0:
            write_failure(root, f"stage 1 failed on {current} (exit {rc}); rerun the job to continue")
            return rc
    if index != 0:
        print(f"host {current}: share done; {hosts[0]} finalizes", flush=True)
        return 0
    return lead(root, hp, case_ids, output)


def lead(root: str, hp: dict, case_ids: list[int], output: str) -> int:
    """The first host: wait for every case's marker, then finalize and verify."""
    wait_s, poll_s = float(hp.get("leader_wait_s", 3600)), float(hp.get("poll_s", 30))
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    deadline = time.monotonic() + wait_s
    try:
        while True:
            marked = storage.marker_ids(output, storage.DONE) | storage.marker_ids(output, storage.FAILED)
            missing = [c for c in case_ids if c not in marked]
            if not missing:
                break
            if stop.is_set():
                return cli.EXIT_INTERRUPTED
            if time.monotonic() >= deadline:
                cmd = (f"master-poc-preprocess --input {hp['input']} --output {output} "
                       f"--cases {','.join(map(str, missing))} --no-finalize && "
                       f"master-poc-preprocess finalize --output {output} --cases {hp['cases']}")
                write_failure(root, f"{len(missing)} cases have no marker after {wait_s:.0f} s: {missing[:30]}"
                                    f"{' ...' if len(missing) > 30 else ''}; finalize is still owed: {cmd}")
                return 1
            print(f"leader: waiting for {len(missing)} cases from the other hosts", flush=True)
            stop.wait(min(poll_s, max(0.0, deadline - time.monotonic())))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    rc = cli.main(["finalize", "--output", output, "--cases", str(hp["cases"])]
                  + _flags(hp, RUN_FLAGS, bools=()))
    if rc != 0:
        write_failure(root, f"finalize/verification failed (exit {rc}); see the log and "
                            f"{storage.join(output, storage.METADATA_NAME)}")
        return rc
    meta = storage.read_json(storage.join(output, storage.METADATA_NAME))
    rate = cli.success_rate(meta)
    min_rate = float(hp.get("min_success_rate", cli.DEFAULT_MIN_SUCCESS_RATE))
    if rate < min_rate:
        write_failure(root, f"success rate {rate:.1%} is below {min_rate:.0%}: failed cases "
                            f"{[f['case_id'] for f in meta['cases']['failed']][:30]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
