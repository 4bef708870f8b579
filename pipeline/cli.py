"""master-poc-preprocess: VitalDB cases -> windowed, normalised, patient-split TFRecords.

    master-poc-preprocess                                   # 20 generated sample cases -> ./output
    master-poc-preprocess --input data/vital-files --clinical data/clinical_data.csv \\
        --output out/ --cases "1-10,17,0022"
    master-poc-preprocess --input s3://b/vital --output s3://b/out --cases 1-3000 --share 2/6   # one of 6 processes
    master-poc-preprocess finalize --output out/            # stage 2 alone (idempotent)
    master-poc-preprocess verify --output out/              # read every file back, compare with markers
    master-poc-preprocess inspect out/ [--examples 3]       # counts, shapes, example windows in clinical units

The command, if any, comes first. Beam's pipeline options pass through to
Beam untouched, in any form (--runner DataflowRunner, --runner=DataflowRunner,
--direct_num_workers 4, --s3_endpoint_url ..., --setup_file ./setup.py); a
flag that is neither listed by --help nor a Beam pipeline option is refused
before any work (exit 2), naming the closest known flags.
Without --runner the job runs on Beam's FnApiRunner (the DirectRunner's
engine, pinned so it behaves the same offline and online) with one worker
process per core.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import sys
from typing import Iterable, Mapping, Optional

from pipeline.api import RunResult, run
from pipeline.options import COMMANDS, EXIT_USAGE, PROG, RunOptions, RunRequest, load_config, request_from_mapping
from pipeline.output.cohort import plural
from pipeline.output.cohort import summary_lines as cohort_lines
from pipeline.output.records import CaseAccount, Metadata
from transforms.settings import COMMAND_LINE, OptionError, Settings, add_flags, declared


class UnknownFlag(OptionError):
    """A flag that is neither this command's nor a Beam pipeline option (or a
    Beam option with a value Beam's parser refuses): refused before any work."""


def _refuse_beam_usage(message: str) -> None:
    # Beam's own parser ignores "ambiguous option" (it cannot arise with
    # allow_abbrev=False); anything else argparse would print and exit for.
    if message.startswith("ambiguous option: "):
        return
    raise UnknownFlag(f"Beam flag: {message}")


def beam_option_parser() -> argparse.ArgumentParser:
    """Beam's parser of every pipeline option: the one
    `PipelineOptions.get_all_options` builds from every registered
    PipelineOptions subclass (StandardOptions, S3Options, FlinkRunnerOptions,
    PortableOptions, ...), whose leftovers Beam logs as "Discarding
    unparseable args" and drops. Taken from Beam through get_all_options'
    add_extra_args_fn hook, so it is Beam's list, never ours. Its errors
    raise UnknownFlag instead of exiting."""
    from apache_beam.options.pipeline_options import PipelineOptions
    built: list = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=built.append)
    parser = built[0]
    parser.error = _refuse_beam_usage
    return parser


def _import_runner_module(runner: str) -> bool:
    """Imports the module of the runner --runner names, resolved as Beam's
    create_runner resolves it (a known name, case-insensitive, 'Runner'
    optional, or a dotted path), as Beam does when it creates the runner: a
    runner module may register options of its own (DaskRunner's). True if
    that registered new PipelineOptions subclasses."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    known = {path.rsplit(".", 1)[-1].lower(): path for path in StandardOptions.ALL_KNOWN_RUNNERS}
    path = known.get(runner.lower(), known.get(runner.lower() + "runner", runner))
    if "." not in path:
        return False  # Beam refuses the name when it creates the runner
    before = len(PipelineOptions.__subclasses__())
    try:
        importlib.import_module(path.rsplit(".", 1)[0])
    except Exception:  # not installed (dask, interactive...): Beam says so when it creates the runner
        return False
    return len(PipelineOptions.__subclasses__()) != before


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag `parser` knows (--config, -v, --verbose, ...)."""
    return [o for action in parser._actions for o in action.option_strings]


def check_beam_args(beam_args: Iterable[str], ours: Iterable[str] = (), where: str = "",
                    commands: Iterable[str] = (), not_here: Mapping[str, str] = None) -> None:
    """Refuses (UnknownFlag, naming each and the closest known flags: `ours`
    and Beam's) what Beam's own parser of every pipeline option would leave
    over: a flag that is not a Beam option, a stray word. `commands`: words
    suggested for a stray one. `not_here`: our flags that are not accepted
    here, {flag: what to do instead}. A Beam option's value Beam's parser
    refuses is an UnknownFlag too (naming the option)."""
    beam_args = list(beam_args)
    if not beam_args:
        return
    parser = beam_option_parser()
    runner = parser.parse_known_args(beam_args)[0].runner
    if runner and _import_runner_module(str(runner)):
        parser = beam_option_parser()
    unknown = parser.parse_known_args(beam_args)[1]
    not_here = dict(not_here or {})
    known = set(ours) | set(option_strings(parser)) | set(not_here)
    problems, i = [], 0
    while i < len(unknown):
        arg = unknown[i]
        i += 1
        if arg == "--":
            problems.append("unexpected argument '--' (Beam takes no positional arguments)")
            break
        if arg.startswith("-") and len(arg) > 1:
            name = arg.split("=", 1)[0]
            if "=" not in arg and i < len(unknown) and not unknown[i].startswith("-"):
                i += 1  # its value (--frobnicate 3)
            if name in not_here:
                problems.append(f"{name} is not a Beam flag ({not_here[name]})")
            else:
                problems.append(f"unknown flag {name}{did_you_mean(name, known)}")
        else:
            hint = did_you_mean(arg, commands, "the command ")
            problems.append(f"unexpected argument {arg!r}{hint}")
    if problems:
        raise UnknownFlag(where + "; ".join(problems))


def did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """' (did you mean --a or --b?)' with the closest of `candidates`, or ''.
    Flags are compared without their leading dashes (all flags share those)."""
    by_name: dict[str, str] = {}
    for c in sorted(set(candidates)):
        by_name.setdefault(c.lstrip("-"), c)
    close = [by_name[c] for c in difflib.get_close_matches(word.lstrip("-"), list(by_name), n=3)]
    if not close:
        return ""
    words = [prefix + c for c in close]
    return f" (did you mean {' or '.join([', '.join(words[:-1]), words[-1]] if len(words) > 1 else words)}?)"


def beam_args_in(values: Mapping, source: str) -> tuple[str, ...]:
    """The Beam flags of a config file's or the hyperparameters' beam_args
    key (one string, shell-split, or a list), split as request_from_mapping
    splits them."""
    if values.get("beam_args") is None:
        return ()
    return request_from_mapping({"beam_args": values["beam_args"]}, source).beam_args


def apply_beam_args_in(values: Mapping, source: str, where: str, after: Iterable[str] = ()) -> None:
    """The Beam flags of a config file's or the hyperparameters' beam_args
    (beam_args_in), checked (a refusal starts with `where`; our own flags
    are refused there) and applied to this process with the flags `after`
    following them, which win (pipeline.run.runtime.setup_io): called as the
    mapping is read, before its options are parsed, so its track map on
    s3:// is read with them."""
    from pipeline.run import runtime
    given = beam_args_in(values, source)
    check_beam_args(given, where=where, not_here=own_flags_not_beam())
    runtime.setup_io([*given, *after])


def own_flags_not_beam() -> dict[str, str]:
    """Our flags, for beam_args in a config file or the hyperparameters:
    there they are options by name, not Beam flags."""
    return {flag: f"an option of this command: give it as {action.dest}, not in beam_args"
            for action in build_parser()._actions for flag in action.option_strings
            if flag.startswith("--") and action.dest not in ("help", "config")}



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
    them. Raises OptionError for a bad value (naming the flag or the file's
    key) and UnknownFlag for a flag that is neither ours nor Beam's.

    The Beam flags are applied to this process where they enter it
    (pipeline.run.runtime.setup_io says the rule): the command line's
    (--s3_endpoint_url, credentials, region) before the config file and the
    track map are read, so an s3:// one is read with them; the config file's
    own beam_args, under the command line's, before its options are parsed
    (its track map). run() applies the request's with its S3 retry options."""
    from pipeline.run import runtime
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    check_beam_args(beam_args, option_strings(parser), commands=COMMANDS + ("inspect",))
    runtime.setup_io(beam_args)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    if args.config:
        source = f"--config {args.config}"
        from_file = load_config(args.config)
        apply_beam_args_in(from_file, source, f"{source}: beam_args: ", after=beam_args)
        request_from_mapping(from_file, source)  # its own keys and values, named as in the file
        given = {**from_file, **given}
    return request_from_mapping(given, COMMAND_LINE, command, tuple(beam_args))


def _inspect(argv: list[str]) -> int:
    from pipeline.run import runtime
    from pipeline.tools.inspect_cmd import inspect
    ap = argparse.ArgumentParser(prog=f"{PROG} inspect", allow_abbrev=False,
                                 description="counts, shapes and example windows in clinical units")
    ap.add_argument("path", help="a .tfrecord.gz file, a split folder or an output folder (local or s3://)")
    ap.add_argument("--examples", type=int, default=2, help="example windows to print (default 2)")
    args, beam_args = ap.parse_known_args(argv)
    try:
        check_beam_args(beam_args, option_strings(ap))
    except OptionError as e:
        print(f"{PROG} inspect: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    runtime.setup_io(beam_args)  # before the path is read
    try:
        return inspect(args.path, args.examples)
    except FileNotFoundError as e:
        print(f"{PROG} inspect: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _stage1_lines(res: RunResult) -> list[str]:
    s1 = res.stage1
    lines = [f"stage 1 done in {res.elapsed_s:.1f} s: {len(s1.done)} of {len(s1.requested)} cases "
             f"committed ({res.counters.get('cases_skipped', 0)} were already), {len(s1.failed)} failed; "
             f"{res.message}"]
    return lines + [f"  failed case {c}: {f.reason}: {f.detail}" for c, f in sorted(s1.failed.items())]


def _verify_lines(res: RunResult) -> list[str]:
    v = res.verification
    lines = [f"{s}: {d.examples} examples in {d.files} files from {d.cases} cases of {d.patients} "
             f"patients (markers: {d.expected_examples} from {d.expected_cases})" for s, d in v.splits.items()]
    if v.excluded:
        lines.append(f"{v.excluded} cases excluded by the cohort's criteria: none of them in a split")
    lines += [f"VERIFY FAILED: {p}" for p in v.problems]
    return lines + ["verify: ok" if res.exit_code == 0 else "verify: FAILED"]


def _ids(ids: list, n: int = 50) -> str:
    return f"{ids[:n]}{' ...' if len(ids) > n else ''}"


def _case_lines(res: RunResult, c: CaseAccount) -> list[str]:
    """The cases: how many of each status, the failures, the reprocessed."""
    counters = res.counters
    lines = [f"  cases: {len(c.ok)} ok, {len(c.too_short)} too short (no window), {len(c.failed)} "
             f"failed, {counters.get('cases_skipped', 0)} skipped (already committed); {c.requested} requested"]
    lines += [f"  failed case {f.case_id}: {f.reason}: {f.detail}" for f in c.failed]
    if c.too_short:
        lines.append(f"  too short for one window (not an error): {list(c.too_short)}")
    if counters.get("cases_input_changed"):
        lines.append(f"  {counters['cases_input_changed']} committed case(s) processed again because their "
                     f"input file changed since the commit (all such cases: {list(c.changed_inputs)})")
    if counters.get("cases_split_key_changed"):
        lines.append(f"  {counters['cases_split_key_changed']} committed case(s) processed again because their "
                     f"split key changed (the clinical table's subjectid): they moved with their patient")
    if c.not_done:
        lines.append(f"  not done yet: {_ids(list(c.not_done))}")
    return lines


def _split_lines(meta: Metadata) -> list[str]:
    split = meta.split
    shares = f"{split.folds} folds" if split.folds else f"{'/'.join(map(str, split.percent))} %"
    lines = [f"  split by {'patient (subjectid)' if split.by == 'patient' else 'case id'}, seed "
             f"{split.seed}, {shares}" + ("" if split.by == "patient" else
                                         ": the clinical table has no subjectid column")]
    for s, d in meta.splits.items():
        lines.append(f"  {s}: {d.windows} windows from {plural(d.cases, 'case')} of "
                     f"{plural(d.patients, 'patient')}"
                     f" -> {meta.output.rstrip('/')}/{s}/ ({len(d.files)} file(s))")
    if split.cases_split_by_case_id:
        lines.append(f"  split by case id, their clinical row names no patient (no subjectid): "
                     f"{_ids(list(split.cases_split_by_case_id))}")
    return lines


def _data_lines(meta: Metadata) -> list[str]:
    """What reading the inputs cost, and what the clinical rows lacked."""
    c, lines = meta.cases, []
    t = meta.transfer
    if t is not None:
        share = f" ({t.share_read:.1%})" if t.share_read is not None else ""
        lines.append(f"  the committed cases' remote input files: {_mb(t.bytes_read)} read of "
                     f"{_mb(t.file_bytes)} in {t.cases} files{share}, {t.requests} requests, "
                     f"{t.retries} retried (when each case was committed)")
    if c.static_defaults:
        lines.append(f"  static defaults used: { {str(k): v for k, v in c.static_defaults.items()} }")
    for cid, bad in c.static_implausible.items():
        lines.append(f"  case {cid}: clinical entry error(s) treated as missing: "
                     + ", ".join(f"{k}={v!r}" for k, v in bad.items()))
    if meta.verification is not None and not meta.verification.ok:
        lines += [f"  VERIFY FAILED: {p}" for p in meta.verification.problems]
    return lines


def summary_lines(res: RunResult) -> list[str]:
    """What a person reads at the end of a run."""
    meta = res.metadata
    if res.stage1 is not None:
        return _stage1_lines(res)
    if res.verification is not None and meta is None:  # verify
        return _verify_lines(res)
    if meta is None:
        return []
    out = meta.output.rstrip("/")
    return ([f"\n{PROG}: {meta.status} in {res.elapsed_s:.1f} s"] + _case_lines(res, meta.cases)
            + _split_lines(meta) + _data_lines(meta) + cohort_lines(meta.cohort)
            + [f"  metadata: {out}/preprocessing_metadata.json", f"  Table 1: {out}/table1.csv",
               f"  quality report: {out}/report/index.html"])


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
        from pipeline.run.runtime import configure_logging
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
