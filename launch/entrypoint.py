"""SageMaker bundled runner: the container's entry point (`docker run IMAGE train`).

Translates SageMaker's environment into a run request and nothing more: the
hyperparameters (`<root>/input/config/hyperparameters.json`, root /opt/ml or
$MASTER_POC_SM_ROOT; SM_HPS as fallback) are the run's options by their
declared names, parsed as a config file is; the host list
(`resourceconfig.json`, SM_HOSTS/SM_CURRENT_HOST as fallback) gives this
host's share I/N of the cases (pipeline.run.coordination: share 1, algo-1,
waits for every marker and finalizes). Stage 1 runs on all vCPUs. Progress
goes to stdout (CloudWatch); a failure reason goes to <root>/output/failure,
which SageMaker shows in the job description. A spot restart simply reruns:
committed cases are skipped.

Hyperparameters (strings, as SageMaker passes them): cases, input, output
(required), any data setting or run option by name (clinical, window, step,
horizon, split, split_seed, crop_anaesthesia, emit_mask, num_shards,
min_success_rate, leader_wait_s, poll_s, shutdown_grace, progress_interval,
...), and beam_args (extra Beam flags, one string). An unknown name, or a
flag in beam_args that is not a Beam pipeline option, is refused before any
work, naming the closest known ones (as the command line does). The S3
options among beam_args apply before anything is read (an s3:// track map).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

from pipeline import api
from pipeline.cli import apply_beam_args_in, did_you_mean, summary_lines
from pipeline.options import EXIT_INTERRUPTED, EXIT_USAGE, RunOptions, RunRequest, request_from_mapping
from pipeline.run.coordination import Share
from transforms.settings import OptionError, Settings, declared

REQUIRED = ("cases", "input", "output")
# Set here from SageMaker's host list, never by a hyperparameter.
NOT_HYPERPARAMETERS = ("share", "sample_cases", "sample_dir")


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
    for key in REQUIRED:
        if not hp.get(key):
            raise ConfigError(f"hyperparameter {key!r} is missing")
    for key in NOT_HYPERPARAMETERS:
        if key in hp:
            raise ConfigError(f"hyperparameter {key!r} is not allowed: SageMaker's host list decides it")
    return hp, current, sorted(hosts)


SOURCE = "hyperparameters.json"


def check_names(hp: dict) -> None:
    """Refuses a hyperparameter that is no option of ours, naming the closest."""
    known = [f.name for f in declared(Settings) + declared(RunOptions)] + ["beam_args"]
    unknown = sorted(set(hp) - set(known))
    if unknown:
        raise OptionError(f"{SOURCE}: unknown option(s) "
                          + ", ".join(name + did_you_mean(name, known) for name in unknown))


def request_for_host(hp: dict, current: str, hosts: list[str]) -> RunRequest:
    """The run request of one host: its share of the cases, all its vCPUs.
    Its Beam flags are checked and applied to this process before the
    options are parsed (a track map on s3:// is read then); api.run applies
    them again with the run's S3 retry options."""
    check_names(hp)
    ours = (f"--direct_num_workers={os.cpu_count() or 1}",)
    apply_beam_args_in(hp, SOURCE, "hyperparameter beam_args: ", after=ours)
    req = request_from_mapping(hp, SOURCE, beam_args=ours)
    share = Share(hosts.index(current) + 1, len(hosts))
    return dataclasses.replace(req, options=dataclasses.replace(req.options, share=share))


def write_failure(root: str, reason: str) -> None:
    os.makedirs(os.path.join(root, "output"), exist_ok=True)
    with open(os.path.join(root, "output/failure"), "w") as fh:
        fh.write(reason[:1000])
    print(f"FAILED: {reason}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.run.runtime import configure_logging
    root = sm_root()
    try:
        hp, current, hosts = read_config(root)
        req = request_for_host(hp, current, hosts)
    except (ConfigError, OptionError, KeyError, ValueError) as e:
        write_failure(root, f"bad job configuration: {e}")
        return EXIT_USAGE
    configure_logging(req.options.verbose)
    os.environ["MASTER_POC_HOST"] = current
    share = req.options.share
    n = len(share.select(req.case_ids()))
    print(f"host {current} ({share.index} of {share.count}): {n} of {len(req.case_ids())} cases, "
          f"{os.cpu_count()} vCPUs", flush=True)
    res = api.run(req)
    for line in summary_lines(res):
        print(line, flush=True)
    if res.exit_code == EXIT_INTERRUPTED:
        print(f"{res.message} (a restart continues)", flush=True)
    elif res.exit_code != 0:
        write_failure(root, f"{current}: {res.status}: {res.message}")
    return res.exit_code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
