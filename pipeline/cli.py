"""master-poc-preprocess: VitalDB cases -> windowed, normalised, patient-split TFRecords.

    master-poc-preprocess                                   # 20 generated sample cases -> ./output
    master-poc-preprocess --input data/vital-files --clinical data/clinical_data.csv \\
        --output out/ --cases "1-10,17,0022"
    master-poc-preprocess --input s3://b/vital --output s3://b/out --cases 1-3000 --share 2/6   # one of 6 processes
    master-poc-preprocess finalize --output out/            # stage 2 alone (idempotent)
    master-poc-preprocess verify --output out/              # read every file back, compare with markers
    master-poc-preprocess inspect out/ [--examples 3]       # counts, shapes, example windows in clinical units

The command, if any, comes first. Flags not listed by --help pass through to
Beam untouched, in any form (--runner DataflowRunner, --runner=DataflowRunner,
--direct_num_workers 4, --s3_endpoint_url ..., --setup_file ./setup.py).
Without --runner the job runs on Beam's FnApiRunner (the DirectRunner's
engine, pinned so it behaves the same offline and online) with one worker
process per core.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

from pipeline.api import RunResult, run
from pipeline.options import COMMANDS, EXIT_USAGE, PROG, RunOptions, RunRequest, load_config, request_from_mapping
from transforms.settings import COMMAND_LINE, OptionError, Settings, add_flags, declared



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage=f"{PROG} [{'|'.join(COMMANDS)}] [options] [Beam flags]\n"
                                       f"       {PROG} inspect PATH [--examples N] [Beam flags]",
                                 allow_abbrev=False)  # a Beam flag must never match one of ours by prefix
    ap.add_argument("--config", metavar="FILE", help="YAML or JSON file with any option below by its name "
                                                     "(split_seed: 7, tracks: ...); flags win. Every output's "
                                                     "config.yaml is such a file")
    add_flags(ap.add_argument_group("data settings (fingerprinted: an output keeps one set)"), declared(Settings))
    add_flags(ap.add_argument_group("run options"), declared(RunOptions))
    return ap


def parse_request(argv: list[str]) -> RunRequest:
    """argv -> RunRequest: a --config file's options, then the flags over
    them. Raises OptionError for a bad value (naming the flag or the file's key)."""
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    args, beam_args = build_parser().parse_known_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    if args.config:
        from_file = load_config(args.config)
        request_from_mapping(from_file, f"--config {args.config}")  # its own keys and values, named as in the file
        given = {**from_file, **given}
    return request_from_mapping(given, COMMAND_LINE, command, tuple(beam_args))


def _inspect(argv: list[str]) -> int:
    from pipeline import runtime, s3
    from pipeline.inspect_cmd import inspect
    ap = argparse.ArgumentParser(prog=f"{PROG} inspect", allow_abbrev=False,
                                 description="counts, shapes and example windows in clinical units")
    ap.add_argument("path", help="a .tfrecord.gz file, a split folder or an output folder (local or s3://)")
    ap.add_argument("--examples", type=int, default=2, help="example windows to print (default 2)")
    args, beam_args = ap.parse_known_args(argv)
    runtime.setup_io(beam_args, s3.DEFAULT_MAX_ATTEMPTS, s3.DEFAULT_RETRY_MODE)
    try:
        return inspect(args.path, args.examples)
    except FileNotFoundError as e:
        print(f"{PROG} inspect: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def summary_lines(res: RunResult) -> list[str]:
    """What a person reads at the end of a run."""
    meta, lines = res.metadata, []
    if res.stage1 is not None:
        s1 = res.stage1
        lines.append(f"stage 1 done in {res.elapsed_s:.1f} s: {len(s1.done)} of {len(s1.requested)} cases "
                     f"committed ({res.counters.get('cases_skipped', 0)} were already), {len(s1.failed)} failed; "
                     f"{res.message}")
        lines += [f"  failed case {c}: {f.reason}: {f.detail}" for c, f in sorted(s1.failed.items())]
        return lines
    if res.verification is not None and meta is None:  # verify
        for s, d in res.verification.splits.items():
            lines.append(f"{s}: {d.examples} examples in {d.files} files from {d.cases} cases of {d.patients} "
                         f"patients (markers: {d.expected_examples} from {d.expected_cases})")
        lines += [f"VERIFY FAILED: {p}" for p in res.verification.problems]
        lines.append("verify: ok" if res.exit_code == 0 else "verify: FAILED")
        return lines
    if meta is None:
        return lines
    c = meta["cases"]
    lines.append(f"\n{PROG}: {meta['status']} in {res.elapsed_s:.1f} s")
    lines.append(f"  cases: {len(c['ok'])} ok, {len(c['too_short'])} too short (no window), {len(c['failed'])} "
                 f"failed, {res.counters.get('cases_skipped', 0)} skipped (already committed); "
                 f"{c['requested']} requested")
    lines += [f"  failed case {f['case_id']}: {f['reason']}: {f['detail']}" for f in c["failed"]]
    if c["too_short"]:
        lines.append(f"  too short for one window (not an error): {c['too_short']}")
    if res.counters.get("cases_input_changed"):
        lines.append(f"  {res.counters['cases_input_changed']} committed case(s) processed again because their "
                     f"input file changed since the commit (all such cases: {c['changed_inputs']})")
    if res.counters.get("cases_split_key_changed"):
        lines.append(f"  {res.counters['cases_split_key_changed']} committed case(s) processed again because their "
                     f"split key changed (the clinical table's subjectid): they moved with their patient")
    if c["not_done"]:
        lines.append(f"  not done yet: {c['not_done'][:50]}{' ...' if len(c['not_done']) > 50 else ''}")
    split = meta["split"]
    shares = f"{split['folds']} folds" if split.get("folds") else f"{'/'.join(map(str, split['percent']))} %"
    lines.append(f"  split by {'patient (subjectid)' if split['by'] == 'patient' else 'case id'}, seed "
                 f"{split['seed']}, {shares}"
                 + ("" if split["by"] == "patient" else ": the clinical table has no subjectid column"))
    for s, d in meta["splits"].items():
        lines.append(f"  {s}: {d['windows']} windows from {_n(d['cases'], 'case')} of {_n(d['patients'], 'patient')}"
                     f" -> {meta['output'].rstrip('/')}/{s}/ ({len(d['files'])} file(s))")
    if split["cases_split_by_case_id"]:
        lines.append(f"  split by case id, their clinical row names no patient (no subjectid): "
                     f"{split['cases_split_by_case_id'][:50]}{' ...' if len(split['cases_split_by_case_id']) > 50 else ''}")
    if meta.get("transfer"):
        t = meta["transfer"]
        share = f" ({t['share_read']:.1%})" if t["share_read"] is not None else ""
        lines.append(f"  the committed cases' remote input files: {_mb(t['bytes_read'])} read of "
                     f"{_mb(t['file_bytes'])} in {t['cases']} files{share}, {t['requests']} requests, "
                     f"{t['retries']} retried (when each case was committed)")
    if c["static_defaults"]:
        lines.append(f"  static defaults used: {c['static_defaults']}")
    for cid, bad in c["static_implausible"].items():
        lines.append(f"  case {cid}: clinical entry error(s) treated as missing: "
                     + ", ".join(f"{k}={v!r}" for k, v in bad.items()))
    if meta["verification"] and not meta["verification"]["ok"]:
        lines += [f"  VERIFY FAILED: {p}" for p in meta["verification"]["problems"]]
    lines.append(f"  metadata: {meta['output'].rstrip('/')}/preprocessing_metadata.json")
    lines.append(f"  quality report: {meta['output'].rstrip('/')}/report/index.html")
    return lines


def main(argv: Optional[list[str]] = None, supervised: bool = True) -> int:
    """The command line. `supervised=False` runs the stages in this process
    (see RunRequest.supervised): for embedding and tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        return _inspect(argv[1:])
    try:
        req = parse_request(argv)
    except OptionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if supervised:
        from pipeline.runtime import configure_logging
        configure_logging(req.options.verbose)
    res = run(dataclasses.replace(req, supervised=supervised))
    for line in summary_lines(res):
        print(line)
    if res.status == "interrupted":
        print(res.message, flush=True)
    elif res.exit_code != 0 and res.message and res.stage1 is None:
        print(f"{PROG}: {'error: ' if res.exit_code == EXIT_USAGE or not res.metadata else ''}{res.message}",
              file=sys.stderr)
    return res.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
