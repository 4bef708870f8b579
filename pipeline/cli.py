"""master-poc-preprocess: VitalDB cases -> windowed, normalised, patient-split TFRecords.

    master-poc-preprocess                                   # 20 generated sample cases -> ./output
    master-poc-preprocess --input data/vital-files --clinical data/clinical_data.csv \\
        --output out/ --cases "1-10,17,0022"
    master-poc-preprocess finalize --output out/            # stage 2 alone (idempotent)
    master-poc-preprocess verify --output out/              # read every file back, compare with markers

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

from pipeline import metadata, stage1, stage2, storage
from transforms import spec
from transforms.beam import NAMESPACE
from transforms.case import Settings
from transforms.cases import CaseSpecError, case_id_from_path, parse_cases
from transforms.load import ClinicalTableError, read_clinical
from transforms.windows import parse_split

_LOG = logging.getLogger("master_poc")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
COMMANDS = ("run", "finalize", "verify")


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
                    help="run (default): stage 1 + stage 2; finalize: stage 2 alone; verify: check an output")
    ap.add_argument("--input", help="folder or s3:// prefix with <id>.vital files (default: generate a sample)")
    ap.add_argument("--clinical", help="clinical_data.csv (default: <input>/clinical_data.csv)")
    ap.add_argument("--output", default="output", help="output folder or s3:// prefix (default ./output)")
    ap.add_argument("--cases", help='case ids, e.g. "1-10,17,0022" (default: every case in --input)')
    ap.add_argument("--num-shards", type=int, default=0,
                    help="files per split (default 0: about %d windows per file)" % stage2.WINDOWS_PER_SHARD)
    ap.add_argument("--min-success-rate", type=float, default=0.95,
                    help="exit 1 if ok/(ok+failed) is below this; too-short cases count neither way (default %(default)s)")
    ap.add_argument("--sample-cases", type=int, default=20, help="cases to generate when --input is not given")
    ap.add_argument("--sample-dir", help="where to generate the sample (default: a new temp folder)")
    ap.add_argument("--overwrite", action="store_true",
                    help="discard an existing output made with other settings and start over")
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


def run_stage1(beam_args, case_ids, input_dir, output, settings, clinical) -> dict[str, int]:
    p = make_pipeline(beam_args)
    stage1.build_stage1(p, case_ids, input_dir, output, settings, clinical)
    result = p.run()
    result.wait_until_finish()
    return counters(result)


def finalize(beam_args, output: str, settings: Settings, *, requested: Optional[list[int]] = None,
             num_shards: int = 0, started: Optional[str] = None, input_dir=None, clinical_path=None) -> dict:
    """Stage 2 + verification + metadata, from the markers alone."""
    started = started or metadata.utcnow()
    done = storage.read_markers(output, storage.DONE)
    failed = {c: f for c, f in storage.read_markers(output, storage.FAILED).items() if c not in done}
    requested = requested if requested is not None else sorted(set(done) | set(failed))
    not_done = [c for c in requested if c not in done and c not in failed]
    plans = stage2.plan_shards(done, spec.SPLIT_NAMES, num_shards, settings.split_seed)
    if plans:
        p = make_pipeline(beam_args)
        stage2.build_stage2(p, output, plans, settings.split_seed)
        p.run().wait_until_finish()
    stage2.remove_stale_shards(output, plans, spec.SPLIT_NAMES)
    storage.delete(storage.list_files(storage.join(output, "cases", "_tmp", "*")))
    verification = stage2.verify_output(output, done, spec.SPLIT_NAMES, os.cpu_count() or 1)
    status = "complete" if verification["ok"] and not not_done else (
        "verification_failed" if not verification["ok"] else "incomplete")
    meta = metadata.build_metadata(settings=settings, status=status, requested=requested, done=done, failed=failed,
                                   verification=verification, started=started, input_dir=input_dir,
                                   clinical=clinical_path, output=output, not_done=not_done)
    storage.write_json(storage.join(output, storage.METADATA_NAME), meta)
    storage.write_atomic(storage.join(output, storage.SCHEMA_NAME), metadata.schema_text(settings).encode())
    return meta


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
    if meta["verification"] and not meta["verification"]["ok"]:
        for prob in meta["verification"]["problems"]:
            print(f"  VERIFY FAILED: {prob}", file=out)
    print(f"  metadata: {storage.join(meta['output'], storage.METADATA_NAME)}", file=out)


def success_rate(meta: dict) -> float:
    ok, failed = len(meta["cases"]["ok"]), len(meta["cases"]["failed"])
    return 1.0 if ok + failed == 0 else ok / (ok + failed)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for noisy in ("apache_beam", "root", "botocore", "absl"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Worker logs are relayed at WARNING; keep ours, drop Beam's start-up chatter.
        for h in logging.getLogger().handlers:
            h.addFilter(lambda r: "semi_persistent_directory" not in r.getMessage())


def main(argv: Optional[list[str]] = None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)
    _configure_logging(args.verbose)
    try:
        return _main(args, beam_args)
    except (UsageError, CaseSpecError, ClinicalTableError) as e:
        print(f"master-poc-preprocess: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _main(args, beam_args) -> int:
    t0 = time.time()
    started = metadata.utcnow()
    output = args.output
    if args.command in ("finalize", "verify"):
        sp = storage.settings_path(output)
        if not storage.exists(sp):
            raise UsageError(f"{output} is not a master-poc output (no {sp})")
        saved = storage.read_json(sp)
        settings = Settings(**{k: (tuple(v) if k == "split" else v) for k, v in saved.items() if k != "spec_version"})
        if args.command == "verify":
            done = storage.read_markers(output, storage.DONE)
            v = stage2.verify_output(output, done, spec.SPLIT_NAMES, os.cpu_count() or 1)
            for s, d in v["splits"].items():
                print(f"{s}: {d['examples']} examples in {d['files']} files from {d['cases']} cases "
                      f"(markers: {d['expected_examples']} from {d['expected_cases']})")
            for prob in v["problems"]:
                print(f"VERIFY FAILED: {prob}")
            print("verify: ok" if v["ok"] else "verify: FAILED")
            return EXIT_OK if v["ok"] else EXIT_FAILED
        meta = finalize(beam_args, output, settings, num_shards=args.num_shards, started=started)
        print_summary(meta, {}, time.time() - t0)
        return EXIT_OK if meta["status"] == "complete" else EXIT_FAILED

    settings = settings_from(args)
    case_ids = parse_cases(args.cases) if args.cases is not None else None  # refused before any work
    input_dir = args.input
    if input_dir is None:
        from pipeline.sample import write_default_sample
        input_dir = args.sample_dir or tempfile.mkdtemp(prefix="master-poc-sample-")
        print(f"no --input: generating {args.sample_cases} VitalDB-format sample cases in {input_dir}")
        write_default_sample(input_dir, args.sample_cases)
    try:
        found = find_cases(input_dir)
    except Exception as e:  # any filesystem's error: a missing bucket, no access, a bad endpoint
        raise UsageError(f"cannot list --input {input_dir}: {e}") from None
    if case_ids is None:
        if not found:
            raise UsageError(f"--input {input_dir} holds no <id>.vital files")
        case_ids = found
    clinical_path = args.clinical or storage.join(input_dir, "clinical_data.csv")
    clinical = read_clinical(clinical_path, case_ids)
    check_output_settings(output, settings, args.overwrite)

    print(f"stage 1: {len(case_ids)} cases from {input_dir} -> {storage.cases_dir(output)}")
    counts = run_stage1(beam_args, case_ids, input_dir, output, settings, clinical)
    print(f"stage 2: writing splits to {output}")
    meta = finalize(beam_args, output, settings, requested=case_ids, num_shards=args.num_shards,
                    started=started, input_dir=input_dir, clinical_path=clinical_path)
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
