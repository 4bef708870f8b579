"""master-poc-preprocess: VitalDB cases -> windowed, normalised, patient-split TFRecords.

    master-poc-preprocess                                   # 20 generated sample cases -> ./output
    master-poc-preprocess --input data/vital-files --clinical data/clinical_data.csv \\
        --output out/ --cases "1-10,17,0022"
    master-poc-preprocess finalize --output out/            # stage 2 alone (idempotent)
    master-poc-preprocess verify --output out/              # read every file back, compare with markers
    master-poc-preprocess inspect out/ [--examples 3]       # counts, shapes, example windows in clinical units

Flags not listed by --help pass through to Beam untouched (--runner,
--direct_num_workers, --s3_endpoint_url, --setup_file, ...). Without
--runner the job runs on Beam's FnApiRunner (the DirectRunner's engine,
pinned so it behaves the same offline and online) with one worker process
per core.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Optional

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from apache_beam.io.filesystems import FileSystems

from pipeline import metadata, report, s3, stage2, storage
from pipeline.progress import Progress
from pipeline.supervisor import Supervisor
from transforms import spec
from transforms.beam import NAMESPACE
from transforms.case import Settings
from transforms.cases import CaseSpecError, case_id_from_path, parse_cases
from transforms.load import ClinicalTableError, read_clinical
from transforms.windows import parse_split

_LOG = logging.getLogger("master_poc")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT; rerun to continue
DEFAULT_MIN_SUCCESS_RATE = 0.95
TIMINGS: dict[str, float] = {}  # wall seconds of this invocation's steps, written into the metadata
COMMANDS = ("run", "finalize", "verify", "inspect")


class UsageError(Exception):
    """Bad input found before any work: printed without a traceback, exit 2."""


def _settings_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("data settings (fingerprinted: an output keeps one set)")
    g.add_argument("--window", type=int, default=spec.WINDOW_S, help="window length in seconds (default %(default)s)")
    g.add_argument("--step", type=int, default=spec.STEP_S, help="seconds between window starts (default %(default)s)")
    g.add_argument("--horizon", type=int, default=spec.HORIZON_S,
                   help="target = second window_start + window - 1 + horizon (default %(default)s)")
    g.add_argument("--split", default=",".join(map(str, spec.SPLIT_PERCENT)),
                   help="train,validation,test percentages (default %(default)s)")
    g.add_argument("--split-seed", type=int, default=spec.SPLIT_SEED, help="split hash seed (default %(default)s)")
    g.add_argument("--crop-anaesthesia", action="store_true",
                   help="use only [anestart, aneend] of the clinical table (default: whole recording)")
    g.add_argument("--emit-mask", action="store_true",
                   help="add feature 'observed' (1 = measured second, 0 = imputed) to every example")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="master-poc-preprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run", choices=COMMANDS,
                    help="run (default): stage 1 + stage 2; finalize: stage 2 alone; verify: check an output; "
                         "inspect PATH: show examples")
    ap.add_argument("path", nargs="?", help="inspect: a .tfrecord.gz file, a split folder or an output folder")
    ap.add_argument("--examples", type=int, default=2, help="inspect: example windows to print (default 2)")
    ap.add_argument("--input", help="folder or s3:// prefix with <id>.vital files (default: generate a sample)")
    ap.add_argument("--clinical", help="clinical_data.csv (default: <input>/clinical_data.csv)")
    ap.add_argument("--output", default="output", help="output folder or s3:// prefix (default ./output)")
    ap.add_argument("--cases", help='case ids, e.g. "1-10,17,0022" (default: every case in --input)')
    ap.add_argument("--num-shards", type=int, default=0,
                    help="files per split (default 0: about %d windows per file)" % stage2.WINDOWS_PER_SHARD)
    ap.add_argument("--min-success-rate", type=float, default=DEFAULT_MIN_SUCCESS_RATE,
                    help="exit 1 if ok/(ok+failed) is below this; too-short cases count neither way (default %(default)s)")
    ap.add_argument("--sample-cases", type=int, default=20, help="cases to generate when --input is not given")
    ap.add_argument("--sample-dir", help="where to generate the sample (default: a new temp folder)")
    ap.add_argument("--no-finalize", action="store_true",
                    help="run stage 1 only (one host's share of a multi-host job); finalize later")
    ap.add_argument("--overwrite", action="store_true",
                    help="discard an existing output made with other settings and start over")
    ap.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds to drain after SIGTERM/SIGINT before the pipeline is killed (default %(default)s)")
    ap.add_argument("--progress-interval", type=float, default=30.0,
                    help="seconds between progress lines (default %(default)s)")
    ap.add_argument("--s3-max-attempts", type=int, default=10,
                    help="attempts per S3 call, Beam's and ours (botocore retries; default %(default)s)")
    ap.add_argument("--s3-retry-mode", default="standard", choices=("standard", "adaptive"),
                    help="botocore retry mode (default %(default)s)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log Beam's INFO messages too")
    _settings_args(ap)
    return ap


def settings_from(args) -> Settings:
    try:
        split = parse_split(args.split)
    except ValueError as e:
        raise UsageError(str(e)) from None
    s = Settings(window=args.window, step=args.step, horizon=args.horizon, split=split,
                 split_seed=args.split_seed, crop_anaesthesia=args.crop_anaesthesia, emit_mask=args.emit_mask)
    try:
        s.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return s


def make_pipeline(beam_args: list[str]) -> beam.Pipeline:
    """A Pipeline for the given Beam flags; FnApiRunner, multi-process, one
    worker per core, unless the flags say otherwise."""
    opts = PipelineOptions(beam_args)
    if opts.view_as(StandardOptions).runner is not None:
        return beam.Pipeline(options=opts)
    direct = opts.view_as(DirectOptions)
    if not any(a.startswith("--direct_running_mode") for a in beam_args):
        direct.direct_running_mode = "multi_processing"
    if direct.direct_running_mode == "in_memory":
        direct.direct_num_workers = 1  # one process: more "workers" would only warn
    elif not any(a.startswith("--direct_num_workers") for a in beam_args) or direct.direct_num_workers == 0:
        direct.direct_num_workers = os.cpu_count() or 1
    return beam.Pipeline(runner=FnApiRunner(), options=opts)


def counters(result) -> dict[str, int]:
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except (NotImplementedError, AttributeError):
        return {}
    return {c.key.metric.name: int(c.committed or c.attempted or 0) for c in res["counters"]}


def find_cases(input_dir: str) -> list[int]:
    ids = {case_id_from_path(p) for p in storage.list_files(storage.join(input_dir, "*.vital"))}
    return sorted(i for i in ids if i is not None)


def check_output_settings(output: str, settings: Settings, overwrite: bool) -> None:
    """An output keeps one set of settings: refuse a silent mix."""
    path = storage.settings_path(output)
    if storage.exists(path):
        old = storage.read_json(path)
        if old != settings.as_dict():
            if not overwrite:
                diff = {k: (old.get(k), v) for k, v in settings.as_dict().items() if old.get(k) != v}
                raise UsageError(f"{output} was made with other settings {diff} (old, new); "
                                 "use another --output, the same settings, or --overwrite to start over")
            _LOG.warning("--overwrite: removing %s made with other settings", output)
            for sub in ("cases",) + spec.SPLIT_NAMES:
                storage.delete_tree(storage.join(output, sub))
            storage.delete([storage.join(output, storage.METADATA_NAME), storage.join(output, storage.SCHEMA_NAME)])
        else:
            return
    storage.write_json(path, settings.as_dict())


def job_payload(stage: int, args, beam_args, output: str, settings: Settings, **kw) -> dict:
    return dict(stage=stage, beam_args=beam_args, output=output, settings=settings.as_dict(),
                verbose=args.verbose, s3_max_attempts=args.s3_max_attempts, s3_retry_mode=args.s3_retry_mode, **kw)


class Interrupted(Exception):
    """A shutdown was asked for (SIGTERM/SIGINT); committed work is kept."""


class StageFailed(Exception):
    """A stage's pipeline failed (its log says why); committed work is kept."""


def _run_supervised(sup: Supervisor, payload: dict) -> dict:
    if sup.stopping:
        raise Interrupted()
    rc, res = sup.run_job(payload)
    if sup.stopping:
        raise Interrupted()
    if rc != 0:
        raise StageFailed(f"stage {payload['stage']} pipeline failed (exit code {rc}, see the log above); "
                          "committed cases are kept, rerun the same command to continue")
    return res.get("counters", {})


def case_step_seconds(done: dict[int, dict]) -> dict[str, float]:
    """Stage 1's seconds per step (load, parse within load, transform,
    encode, compress, write) summed over the committed cases."""
    total: dict[str, float] = {}
    for m in done.values():
        for k, v in m.get("timings", {}).items():
            total[k] = total.get(k, 0.0) + v
    return {k: round(v, 3) for k, v in total.items()}


def write_metadata(output: str, settings: Settings, status: str, *, requested=None, verification=None,
                   started=None, input_dir=None, clinical_path=None, done=None) -> dict:
    done = storage.read_markers(output, storage.DONE) if done is None else done
    failed = {c: f for c, f in storage.read_markers(output, storage.FAILED).items() if c not in done}
    requested = requested if requested is not None else sorted(set(done) | set(failed))
    not_done = [c for c in requested if c not in done and c not in failed]
    if status == "complete" and not_done:
        status = "incomplete"
    t = time.time()
    meta = metadata.build_metadata(settings=settings, status=status, requested=requested, done=done, failed=failed,
                                   verification=verification, started=started or metadata.utcnow(),
                                   input_dir=input_dir, clinical=clinical_path, output=output, not_done=not_done)
    report.write_report(output, done, failed, meta["status"])
    TIMINGS["metadata_report_s"] = round(time.time() - t, 3)
    meta["timings"] = dict(TIMINGS, case_steps_s=case_step_seconds(done))
    storage.write_json(storage.join(output, storage.METADATA_NAME), meta)
    storage.write_atomic(storage.join(output, storage.SCHEMA_NAME), metadata.schema_text(settings).encode())
    return meta


def finalize(sup: Supervisor, args, beam_args, output: str, settings: Settings, *,
             requested: Optional[list[int]] = None, started: Optional[str] = None, input_dir=None,
             clinical_path=None) -> dict:
    """Stage 2 + verification + metadata, from the markers alone."""
    t2 = time.time()
    done = storage.read_markers(output, storage.DONE)
    # A case object that is not what its marker says (truncated, missing) is
    # named and its case demoted to failed (a rerun recomputes it); the
    # split files are written from the others.
    damaged = stage2.check_case_objects(output, done, spec.SPLIT_NAMES)
    for cid, detail in damaged.items():
        _LOG.error("case %s: %s; the case is now failed (%s): rerun to recompute it", cid, detail, stage2.DAMAGED)
        storage.demote(output, cid, stage2.DAMAGED, detail)
        done.pop(cid)
    plans = stage2.plan_shards(output, done, spec.SPLIT_NAMES, args.num_shards, settings.split_seed)
    if plans:
        counts = _run_supervised(sup, job_payload(2, args, beam_args, output, settings,
                                                  plans=[p.to_json() for p in plans]))
        TIMINGS["stage2_shard_write_s"] = round(counts.get("shard_write_us", 0) / 1e6, 6)
    stage2.remove_stale_shards(output, plans, spec.SPLIT_NAMES)
    storage.delete(storage.list_files(storage.join(output, "cases", "_tmp", "*")))
    if sup.stopping:
        raise Interrupted()
    t3 = time.time()
    TIMINGS["stage2_s"] = round(t3 - t2, 3)
    verification = stage2.verify_output(output, done, spec.SPLIT_NAMES, os.cpu_count() or 1)
    # Damage found only by reading (a changed byte): the split file holding it
    # is reported; its case is demoted so the next finalize leaves it out.
    for cid, detail in verification["damaged_cases"].items():
        storage.demote(output, cid, stage2.DAMAGED, detail)
        done.pop(cid, None)
    if damaged:
        verification["ok"] = False
        verification["problems"] += [f"case {c}: {d} (case demoted to failed: rerun to recompute it)"
                                     for c, d in damaged.items()]
    TIMINGS["verify_s"] = round(time.time() - t3, 3)
    return write_metadata(output, settings, "complete" if verification["ok"] else "verification_failed",
                          requested=requested, verification=verification, started=started, input_dir=input_dir,
                          clinical_path=clinical_path, done=done)


def print_summary(meta: dict, counts: dict[str, int], elapsed: float, out=None) -> None:
    out = out or sys.stdout
    c = meta["cases"]
    w = lambda s: f"{s}: {meta['splits'][s]['windows']} windows from {meta['splits'][s]['cases']} cases"
    print(f"\nmaster-poc-preprocess: {meta['status']} in {elapsed:.1f} s", file=out)
    print(f"  cases: {len(c['ok'])} ok, {len(c['too_short'])} too short (no window), {len(c['failed'])} failed, "
          f"{counts.get('cases_skipped', 0)} skipped (already committed); {c['requested']} requested", file=out)
    for f in c["failed"]:
        print(f"  failed case {f['case_id']}: {f['reason']}: {f['detail']}", file=out)
    if c["too_short"]:
        print(f"  too short for one window (not an error): {c['too_short']}", file=out)
    if c["not_done"]:
        print(f"  not done yet: {c['not_done']}", file=out)
    for s in spec.SPLIT_NAMES:
        print(f"  {w(s)} -> {storage.split_dir(meta['output'], s)}/ ({len(meta['splits'][s]['files'])} file(s))", file=out)
    if c["static_defaults"]:
        print(f"  static defaults used: {c['static_defaults']}", file=out)
    for cid, bad in c["static_implausible"].items():
        print(f"  case {cid}: clinical entry error(s) treated as missing: "
              + ", ".join(f"{k}={v!r}" for k, v in bad.items()), file=out)
    if meta["verification"] and not meta["verification"]["ok"]:
        for prob in meta["verification"]["problems"]:
            print(f"  VERIFY FAILED: {prob}", file=out)
    print(f"  metadata: {storage.join(meta['output'], storage.METADATA_NAME)}", file=out)
    print(f"  quality report: {storage.join(meta['output'], 'report', 'index.html')}", file=out)


def success_rate(meta: dict) -> float:
    ok, failed = len(meta["cases"]["ok"]), len(meta["cases"]["failed"])
    return 1.0 if ok + failed == 0 else ok / (ok + failed)


def apply_s3_retry_env(max_attempts: int, mode: str) -> None:
    s3.apply_retry_env(max_attempts, mode)
    s3.log_retries()
    s3.share_boto3_clients()


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for noisy in ("apache_beam", "root", "botocore", "absl"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Worker logs are relayed at WARNING; keep ours, drop Beam's start-up chatter.
        for h in logging.getLogger().handlers:
            h.addFilter(lambda r: "semi_persistent_directory" not in r.getMessage())


def main(argv: Optional[list[str]] = None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)
    configure_logging(args.verbose)
    apply_s3_retry_env(args.s3_max_attempts, args.s3_retry_mode)
    # Our own FileSystems calls (listing, markers) use the same S3/GCS options as the pipeline.
    FileSystems.set_options(PipelineOptions(beam_args))
    s3.export_options_to_env(PipelineOptions(beam_args))
    try:
        return _main(args, beam_args)
    except (UsageError, CaseSpecError, ClinicalTableError, s3.S3AccessError) as e:
        print(f"master-poc-preprocess: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailed as e:
        print(f"master-poc-preprocess: error: {e}", file=sys.stderr)
        return EXIT_FAILED


def load_settings(output: str) -> Settings:
    from pipeline.job import settings_from_dict
    sp = storage.settings_path(output)
    if not storage.exists(sp):
        raise UsageError(f"{output} is not a master-poc output (no {sp})")
    return settings_from_dict(storage.read_json(sp))


def verify_command(output: str) -> int:
    load_settings(output)
    done = storage.read_markers(output, storage.DONE)
    v = stage2.verify_output(output, done, spec.SPLIT_NAMES, os.cpu_count() or 1)
    for s, d in v["splits"].items():
        print(f"{s}: {d['examples']} examples in {d['files']} files from {d['cases']} cases "
              f"(markers: {d['expected_examples']} from {d['expected_cases']})")
    for prob in v["problems"]:
        print(f"VERIFY FAILED: {prob}")
    print("verify: ok" if v["ok"] else "verify: FAILED")
    return EXIT_OK if v["ok"] else EXIT_FAILED


def _main(args, beam_args) -> int:
    t0 = time.time()
    started = metadata.utcnow()
    output = args.output
    s3.preflight({"--input": args.input, "--clinical": args.clinical, "--output": output},
                 PipelineOptions(beam_args))
    if args.command == "verify":
        return verify_command(output)
    if args.command == "inspect":
        from pipeline.inspect_cmd import inspect
        if not args.path:
            raise UsageError("inspect needs a PATH: a .tfrecord.gz file, a split folder or an output folder")
        try:
            return inspect(args.path, args.examples)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    with Supervisor(args.shutdown_grace) as sup:
        try:
            return _run(sup, args, beam_args, t0, started)
        except Interrupted:
            return _interrupted(sup, args, output, started, t0)


def _interrupted(sup: Supervisor, args, output: str, started: str, t0: float) -> int:
    """Records what was done (committed cases are safe) and what is owed."""
    if storage.exists(storage.settings_path(output)):
        meta = write_metadata(output, load_settings(output), "incomplete", requested=getattr(args, "_requested", None),
                              started=started, input_dir=args.input, clinical_path=args.clinical)
        c = meta["cases"]
        print(f"stopped by {signal_name(sup.stop_signal)} after {time.time() - t0:.1f} s"
              f"{' (pipeline killed after the grace period)' if sup.child_killed else ''}: "
              f"{len(c['ok']) + len(c['too_short'])} cases committed, {len(c['failed'])} failed, "
              f"{len(c['not_done'])} not done yet: {c['not_done'][:50]}{' ...' if len(c['not_done']) > 50 else ''}")
        print("rerun the same command to continue; committed cases are skipped", flush=True)
    return EXIT_INTERRUPTED


def _stage1_summary(output: str, case_ids: list[int], counts: dict, t0: float) -> int:
    done = storage.marker_ids(output, storage.DONE) & set(case_ids)
    failed = storage.read_markers(output, storage.FAILED, sorted((storage.marker_ids(output, storage.FAILED)
                                                                   & set(case_ids)) - done))
    print(f"\nstage 1 done in {time.time() - t0:.1f} s: {len(done)} of {len(case_ids)} cases committed "
          f"({counts.get('cases_skipped', 0)} were already), {len(failed)} failed; finalize is still owed")
    for c, f in sorted(failed.items()):
        print(f"  failed case {c}: {f['reason']}: {f['detail']}")
    return EXIT_OK if len(done) + len(failed) == len(case_ids) else EXIT_FAILED


def signal_name(sig) -> str:
    import signal as _signal
    return _signal.Signals(sig).name if sig else "a signal"


def _run(sup: Supervisor, args, beam_args, t0: float, started: str) -> int:
    output = args.output
    if args.command == "finalize":
        settings = load_settings(output)
        requested = parse_cases(args.cases) if args.cases is not None else None
        meta = finalize(sup, args, beam_args, output, settings, requested=requested, started=started)
        print_summary(meta, {}, time.time() - t0)
        return EXIT_OK if meta["status"] == "complete" else EXIT_FAILED

    settings = settings_from(args)
    case_ids = parse_cases(args.cases) if args.cases is not None else None  # refused before any work
    input_dir = args.input
    if input_dir is None:
        from pipeline.sample import write_default_sample
        input_dir = args.input = args.sample_dir or tempfile.mkdtemp(prefix="master-poc-sample-")
        print(f"no --input: generating {args.sample_cases} VitalDB-format sample cases in {input_dir}")
        write_default_sample(input_dir, args.sample_cases)
    try:
        found = find_cases(input_dir)
    except Exception as e:  # any filesystem's error: no access, a bad endpoint, ...
        raise UsageError(f"cannot list --input {input_dir}: {e}") from None
    if case_ids is None:
        if not found:
            raise UsageError(f"--input {input_dir} holds no <id>.vital files")
        case_ids = found
    args._requested = case_ids
    clinical_path = args.clinical = args.clinical or storage.join(input_dir, "clinical_data.csv")
    clinical = read_clinical(clinical_path, case_ids)
    check_output_settings(output, settings, args.overwrite)

    print(f"stage 1: {len(case_ids)} cases from {input_dir} -> {storage.cases_dir(output)}", flush=True)
    progress = Progress(output, case_ids)
    progress.snapshot()  # the baseline: cases/min counts only this run's work
    sup.progress, sup.progress_interval_s = progress, args.progress_interval
    t1 = time.time()
    counts = _run_supervised(sup, job_payload(1, args, beam_args, output, settings, case_ids=case_ids,
                                              input=input_dir, clinical=clinical.to_json()))
    TIMINGS["stage1_s"] = round(time.time() - t1, 3)
    progress()
    if args.no_finalize:
        return _stage1_summary(output, case_ids, counts, t0)
    print(f"stage 2: writing splits to {output}", flush=True)
    meta = finalize(sup, args, beam_args, output, settings, requested=case_ids, started=started,
                    input_dir=input_dir, clinical_path=clinical_path)
    print_summary(meta, counts, time.time() - t0)
    if meta["status"] != "complete":
        return EXIT_FAILED
    rate = success_rate(meta)
    if rate < args.min_success_rate:
        print(f"master-poc-preprocess: success rate {rate:.1%} is below --min-success-rate "
              f"{args.min_success_rate:.0%}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
