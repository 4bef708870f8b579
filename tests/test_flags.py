"""A flag that is neither ours nor a Beam pipeline option is refused before
any work (exit 2), naming the closest known flags; every Beam option passes
through in the form it was given. Beam's own parser of every registered
PipelineOptions subclass decides what a Beam option is."""
import gc
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.cli import UnknownFlag, main, parse_request
from transforms.settings import OptionError

CLI = os.path.join(os.path.dirname(sys.executable), "master-poc-preprocess")


# parse_request applies the Beam flags' S3 options to this process: undone after each test (conftest).
pytestmark = pytest.mark.usefixtures("io_settings_restored")


@pytest.mark.parametrize("beam", [
    ["--runner", "DataflowRunner"],
    ["--runner=DataflowRunner"],
    ["--direct_num_workers", "4"],
    ["--direct_num_workers=4"],
    ["--s3_endpoint_url", "http://127.0.0.1:9000"],
    ["--setup_file", "./setup.py"],
    ["--save_main_session"],
    # S3Options, GoogleCloudOptions, WorkerOptions, SetupOptions
    ["--s3_region_name", "eu-central-1", "--s3_access_key_id=AK", "--s3_disable_ssl", "--s3_verify", "false"],
    ["--project", "my-project", "--region", "europe-west1", "--temp_location=gs://b/tmp", "--num_workers", "8",
     "--requirements_file", "req.txt", "--no_use_public_ips"],
    # FlinkRunnerOptions, PortableOptions, SparkRunnerOptions, PrismRunnerOptions
    ["--runner", "FlinkRunner", "--flink_master", "localhost:8081", "--flink_version", "1.19", "--parallelism=4"],
    ["--runner=PortableRunner", "--job_endpoint", "embed", "--environment_type", "LOOPBACK",
     "--environment_config=localhost:50000", "--sdk_worker_parallelism", "2"],
    ["--spark_master_url", "spark://h:7077", "--prism_log_level=debug"],
    # repeated, and a value that looks like a flag, in the = form
    ["--experiments=use_runner_v2", "--experiments=no_use_multiple_sdk_containers", "--experiments=--odd"],
    ["--experiments", "a", "--experiment", "b"],
    # negative-looking and empty values
    ["--job_name=", "--max_num_workers", "-1"],
])
def test_each_form_of_a_beam_option_passes_through_exactly(beam):
    req = parse_request(["--output", "o", *beam[:1], "--horizon", "5", *beam[1:], "-v"])
    assert list(req.beam_args) == beam
    assert (req.options.output, req.settings.horizon, req.options.verbose) == ("o", 5, True)
    assert parse_request(["finalize", *beam, "--output", "o"]).beam_args == tuple(beam)
    assert parse_request(["verify", *beam]).beam_args == tuple(beam)


def test_a_misspelt_flag_exits_2_naming_the_closest_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--crop-anesthesia", "--output", str(out), "--sample-cases", "2",
                 "--direct_running_mode=in_memory"], supervised=False) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("master-poc-preprocess: error: unknown flag --crop-anesthesia "
                           "(did you mean --crop-anaesthesia?)")
    assert not out.exists()


def test_the_console_script_refuses_it_too(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([CLI, "--output", str(out), "--crop-anesthesia"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert "master-poc-preprocess: error: unknown flag --crop-anesthesia (did you mean --crop-anaesthesia?)" \
        in res.stderr
    assert "Unparseable" not in res.stderr + res.stdout and "Discarding" not in res.stderr + res.stdout
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--frobnicate", "3"], "unknown flag --frobnicate"),
    (["--frobnicate=3"], "unknown flag --frobnicate"),
    (["-x"], "unknown flag -x"),
    # our flags are spelt with hyphens, Beam's with underscores
    (["--split_seed", "7"], "unknown flag --split_seed (did you mean --split-seed or --split?)"),
    (["--s3-endpoint-url", "http://h"], "unknown flag --s3-endpoint-url (did you mean --s3_endpoint_url?)"),
    (["--direct_num_worker", "4"],
     "unknown flag --direct_num_worker (did you mean --direct_num_workers, --num_workers or --max_num_workers?)"),
    (["--runer", "DataflowRunner"], "unknown flag --runer (did you mean --runner?)"),
    # a Beam flag that only starts like one of ours is no Beam flag either
    (["--output_table", "t"], "unknown flag --output_table (did you mean --output_executable_path or --output?)"),
    (["--frobnicate", "3", "--crop-anesthesia", "--runner", "DirectRunner"],
     "unknown flag --frobnicate; unknown flag --crop-anesthesia (did you mean --crop-anaesthesia?)"),
    # a stray word: a misspelt command would otherwise have run the whole job
    (["finalise", "--output", "o"], "unexpected argument 'finalise' (did you mean the command finalize?)"),
    (["--output", "o", "--", "--runner", "X"], "unexpected argument '--' (Beam takes no positional arguments)"),
    # a Beam option's value Beam's own parser refuses
    (["--direct_running_mode=fast"], "Beam flag: argument --direct_running_mode: invalid choice: 'fast'"),
    (["--direct_num_workers", "four"], "Beam flag: argument --direct_num_workers: invalid int value: 'four'"),
    (["--experiments", "--odd"], "Beam flag: argument --experiment/--experiments: expected one argument"),
])
def test_what_is_neither_ours_nor_beams_is_refused_by_name(argv, message):
    with pytest.raises(UnknownFlag) as err:
        parse_request(argv)
    assert str(err.value).startswith(message)
    assert isinstance(err.value, OptionError)


def test_any_registered_pipeline_options_subclass_is_a_beam_option():
    """No list of Beam's flags here: a PipelineOptions subclass registered
    later (a plugin's, a runner module's) is known as Beam knows it."""
    from apache_beam.options.pipeline_options import PipelineOptions
    with pytest.raises(UnknownFlag, match="unknown flag --my_plugin_option"):
        parse_request(["--my_plugin_option", "x"])

    class MyPluginOptions(PipelineOptions):
        @classmethod
        def _add_argparse_args(cls, parser):
            parser.add_argument("--my_plugin_option")
            parser.add_argument("--my_plugin_switch", action="store_true")

    try:
        assert parse_request(["--my_plugin_option", "x", "--my_plugin_switch", "--output", "o"]).beam_args == \
            ("--my_plugin_option", "x", "--my_plugin_switch")
        with pytest.raises(UnknownFlag) as err:
            parse_request(["--my_plugin_optoin", "x"])
        assert str(err.value) == "unknown flag --my_plugin_optoin (did you mean --my_plugin_option or " \
                                 "--my_plugin_switch?)"
    finally:
        del MyPluginOptions
        gc.collect()


def test_the_runners_module_is_imported_for_its_options(tmp_path, monkeypatch):
    """As Beam creates the runner --runner names (here a dotted path), the
    options its module registers are Beam options."""
    (tmp_path / "myrunner_for_flags.py").write_text(textwrap.dedent('''
        from apache_beam.options.pipeline_options import PipelineOptions
        from apache_beam.runners.runner import PipelineRunner

        class MyRunnerOptions(PipelineOptions):
            @classmethod
            def _add_argparse_args(cls, parser):
                parser.add_argument("--my_runner_master")

        class MyRunner(PipelineRunner):
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        req = parse_request(["--runner", "myrunner_for_flags.MyRunner", "--my_runner_master", "h:1"])
        assert req.beam_args == ("--runner", "myrunner_for_flags.MyRunner", "--my_runner_master", "h:1")
    finally:
        sys.modules.pop("myrunner_for_flags", None)
        gc.collect()
    # an unknown runner's name is Beam's to refuse when it creates the runner; its flags are checked as ever
    assert parse_request(["--runner", "NoSuchRunner"]).beam_args == ("--runner", "NoSuchRunner")
    with pytest.raises(UnknownFlag, match="unknown flag --no_such_runner_option"):
        parse_request(["--runner", "no.such.Runner", "--no_such_runner_option", "1"])


def test_a_config_files_beam_args_are_checked_too(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("horizon: 5\nbeam_args: --direct_running_mode=in_memory --experiments=a\n")
    req = parse_request(["--config", str(cfg), "--runner", "DirectRunner"])
    assert req.beam_args == ("--direct_running_mode=in_memory", "--experiments=a", "--runner", "DirectRunner")
    cfg.write_text("beam_args: --direct_running_mode=in_memory --frobnicate 3\n")
    with pytest.raises(UnknownFlag) as err:
        parse_request(["--config", str(cfg)])
    assert str(err.value) == f"--config {cfg}: beam_args: unknown flag --frobnicate"
    cfg.write_text("beam_args: [--window, '600']\n")
    with pytest.raises(UnknownFlag) as err:
        parse_request(["--config", str(cfg)])
    assert str(err.value) == (f"--config {cfg}: beam_args: --window is not a Beam flag (an option of this "
                              "command: give it as window, not in beam_args)")


def test_inspect_refuses_an_unknown_flag(tmp_path, capsys):
    assert main(["inspect", str(tmp_path), "--exampels", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("master-poc-preprocess inspect: error: unknown flag --exampels "
                                               "(did you mean --examples or --beam_plugins?)")
    assert main(["inspect", str(tmp_path), "--frobnicate", "--s3_region_name", "eu-west-1"]) == 2
    assert capsys.readouterr().err.strip() == "master-poc-preprocess inspect: error: unknown flag --frobnicate"


HP = {"cases": "1-3", "input": "s3://a/in", "output": "s3://a/out"}


def test_sagemaker_hyperparameters_are_checked_like_the_command_line():
    from launch import entrypoint
    n = os.cpu_count() or 1
    req = entrypoint.request_for_host({**HP, "beam_args": "--direct_running_mode=in_memory --experiments=a"},
                                      "algo-1", ["algo-1"])
    assert req.beam_args == ("--direct_running_mode=in_memory", "--experiments=a", f"--direct_num_workers={n}")
    for hp, message in (
            ({**HP, "crop_anesthesia": "true"},
             "hyperparameters.json: unknown option(s) crop_anesthesia (did you mean crop_anaesthesia?)"),
            ({**HP, "windw": "600", "frobnicate": "1"},
             "hyperparameters.json: unknown option(s) frobnicate, windw (did you mean window?)"),
            ({**HP, "beam_args": "--crop-anesthesia"},
             "hyperparameter beam_args: unknown flag --crop-anesthesia (did you mean --crop-anaesthesia?)"),
            ({**HP, "beam_args": "--runner DirectRunner --frobnicate 3"},
             "hyperparameter beam_args: unknown flag --frobnicate"),
            ({**HP, "beam_args": "--crop-anaesthesia"},
             "hyperparameter beam_args: --crop-anaesthesia is not a Beam flag (an option of this command: give it "
             "as crop_anaesthesia, not in beam_args)")):
        with pytest.raises(OptionError) as err:
            entrypoint.request_for_host(hp, "algo-1", ["algo-1"])
        assert str(err.value) == message


def test_the_entry_point_writes_the_refusal_as_the_failure_reason(tmp_path, monkeypatch):
    import json

    from launch import entrypoint
    cfg = tmp_path / "input" / "config"
    cfg.mkdir(parents=True)
    (cfg / "hyperparameters.json").write_text(json.dumps({**HP, "beam_args": "--direct_num_worker 4"}))
    (cfg / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    monkeypatch.setenv("MASTER_POC_SM_ROOT", str(tmp_path))
    assert entrypoint.main(["train"]) == 2
    assert (tmp_path / "output" / "failure").read_text() == (
        "bad job configuration: hyperparameter beam_args: unknown flag --direct_num_worker (did you mean "
        "--direct_num_workers, --num_workers or --max_num_workers?)")
