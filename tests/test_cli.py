"""The command line as users write it: Beam flags pass through in every form,
our own options are parsed by the one declaration, and a run through Beam's
portable job API gives the default runner's examples."""
import os
import subprocess
import sys

import pytest

from pipeline.cli import parse_request
from transforms.settings import OptionError

CLI = os.path.join(os.path.dirname(sys.executable), "master-poc-preprocess")


# parse_request applies the Beam flags' S3 options to this process: undone after each test (conftest).
pytestmark = pytest.mark.usefixtures("io_settings_restored")


@pytest.mark.parametrize("argv,command,beam", [
    # space-separated, as Beam's docs write flags; ours before and after them
    (["--input", "gs://b/vital", "--output", "gs://b/out", "--cases", "1-3000", "--runner", "DataflowRunner",
      "--project", "my-project", "--region", "europe-west1", "--temp_location", "gs://b/tmp",
      "--setup_file", "./setup.py"],
     "run", ["--runner", "DataflowRunner", "--project", "my-project", "--region", "europe-west1",
             "--temp_location", "gs://b/tmp", "--setup_file", "./setup.py"]),
    (["--runner=FlinkRunner", "--input", "x", "--flink_master", "localhost:8081", "--horizon", "5",
      "--environment_type=LOOPBACK", "--save_main_session", "--output", "o"],
     "run", ["--runner=FlinkRunner", "--flink_master", "localhost:8081", "--environment_type=LOOPBACK",
             "--save_main_session"]),
    (["finalize", "--runner", "PortableRunner", "--output", "o", "--job_endpoint", "embed"],
     "finalize", ["--runner", "PortableRunner", "--job_endpoint", "embed"]),
    (["verify", "--output", "o", "--s3_endpoint_url", "http://127.0.0.1:9000"],
     "verify", ["--s3_endpoint_url", "http://127.0.0.1:9000"]),
    # a Beam flag that starts like one of ours is not taken for it
    (["--output", "o", "--output_executable_path", "job.jar", "--window", "9"], "run",
     ["--output_executable_path", "job.jar"]),
])
def test_beam_flags_pass_through_in_every_form(argv, command, beam):
    req = parse_request(argv)
    assert req.command == command and list(req.beam_args) == beam
    assert req.options.output in ("gs://b/out", "o")


def test_our_options_are_parsed_by_the_declaration_and_named_when_wrong():
    req = parse_request(["--window", "600", "--split", "80,10,10", "--emit-mask", "-v", "--share", "2/4",
                         "--min-success-rate", "0.5"])
    assert (req.settings.window, req.settings.split, req.settings.emit_mask) == (600, (80, 10, 10), True)
    assert (req.options.verbose, str(req.options.share), req.options.min_success_rate) == (True, "2/4", 0.5)
    for argv, named in ((["--window", "0"], "--window '0': must be a positive integer"),
                        (["--split", "70,20"], "--split '70,20'"),
                        (["--share", "0/3"], "--share '0/3'"),
                        (["--cases", "1-3,x"], "--cases '1-3,x': bad part(s) 'x'"),
                        (["--s3-retry-mode", "fast"], "--s3_retry_mode 'fast': expected one of standard, adaptive")):
        with pytest.raises(OptionError) as err:
            parse_request(argv)
        assert named.replace("--s3_retry_mode", "--s3-retry-mode") in str(err.value)


def test_portable_runner_through_the_console_script_equals_the_default_runner(run_output, dataset, tmp_path):
    """Beam's portable job API (the submission path of Flink, Spark and
    Dataflow), flags space-separated: the default runner's examples, example
    by example (the same bytes)."""
    out = tmp_path / "portable"
    res = subprocess.run([CLI, "--input", dataset, "--output", str(out), "--cases", "1-3",
                          "--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "LOOPBACK"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "complete" in res.stdout
    ref = records(run_output[1])
    got = records(str(out))
    assert sorted(got) == [k for k in sorted(ref) if k[0] in (1, 2, 3)] and len(got) > 100
    assert all(got[k] == ref[k] for k in got)


def records(out: str) -> dict:
    """{(case_id, window_start): serialized example} of an output's split files."""
    from pipeline.output import storage
    from transforms import encode, spec, tfrecord
    dec = encode.examples_decoder({"case_id": "int", "window_start": "int"})
    found = {}
    for s in spec.SPLIT_NAMES:
        for f in storage.list_files(storage.split_files_glob(out, s)):
            with open(f, "rb") as fh:
                recs = list(tfrecord.iter_records(fh))
            rb = dec.DecodeBatch(recs)
            keys = zip(rb.column("case_id").flatten().to_pylist(), rb.column("window_start").flatten().to_pylist())
            found.update(dict(zip(keys, recs)))
    return found


def test_help_lists_every_declared_option(capsys):
    from pipeline.cli import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    from pipeline.options import RunOptions
    from transforms.settings import Settings, declared, flag_names
    flags = [flag for f in declared(Settings) + declared(RunOptions) for flag in flag_names(f)]
    assert len(flags) > 25
    for flag in flags:
        assert f"{flag} " in text or f"{flag}\n" in text or f"{flag}," in text, flag
