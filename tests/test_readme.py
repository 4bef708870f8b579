"""The README and the docs are true: their reading snippets run on a real
output, and every command block, in README.md or any docs/*.md page, either
runs here, as printed (cloud commands through --dry-run), or is listed below
as not runnable here, with the reason. A new block without an entry fails
the suite."""
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import INMEM, TO_INTELLIVUE, split_bytes

from pipeline import cli
from pipeline.tools import sample

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
# Every page a command block may live in: the README, then the docs site's pages.
PAGES = {path: path.read_text() for path in [README] + sorted((ROOT / "docs").glob("*.md"))}

# Blocks that run elsewhere or cannot run here, and why.
ELSEWHERE = {
    "two-commands": "./run.sh runs exactly as printed in "
                    "test_end_to_end::test_the_readmes_first_command_runs_the_sample_job; "
                    "./test.sh is this suite (CI runs it)",
    "inspect": "runs exactly as printed, on ./run.sh's output, in "
               "test_end_to_end::test_the_readmes_first_command_runs_the_sample_job",
    "image-build": "builds the image (minutes): test_image runs these two scripts (./test.sh -m image)",
    "image-push": "needs AWS credentials, an ECR registry and docker; neither is reachable here",
    "resume": "needs the real bucket; the same command, as a failed leader prints it, completes a job in "
              "test_sagemaker::test_a_leader_without_its_second_host_names_the_missing_cases_and_the_command_that_completes_the_job",
    "cohort-bench": "a benchmark (prints figures, ~30 s): run by hand, its figures are in docs/benchmarks.md; "
                    "test_cohort::test_the_flow_decides_fast_on_tables_of_the_real_sizes checks its decisions",
    "bench": "a benchmark (minutes, prints figures): run by hand, its dated figures are in docs/benchmarks.md",
    "scale": "a benchmark (minutes, prints figures): run by hand, its dated figures are in docs/benchmarks.md",
    "runners": "needs a GCP project (Dataflow) or a Flink cluster; test_runner_blocks_pass_their_beam_flags_through "
               "parses both commands here",
}


BLOCK = r"<!-- block: ([\w-]+) -->\s*```(\w+)\n(.*?)```"
SNIPPET = r"<!-- snippet:([\w-]+) -->\s*```python\n(.*?)```"


def marked(pattern: str) -> list[tuple]:
    """(name, ..., page) of every marked block of every page, in order."""
    return [found + (path,) for path, text in PAGES.items() for found in re.findall(pattern, text, re.S)]


def blocks() -> dict[str, tuple[str, str, Path]]:
    """{name: (language, body, page)} of the marked blocks of the README and
    every docs page (names are unique across all of them)."""
    found = {}
    for name, lang, body, path in marked(BLOCK):
        assert name not in found, f"block {name!r} is in {found[name][2].name} and in {path.name}"
        found[name] = (lang, body, path)
    return found


def snippet(name: str) -> str:
    """The body of the python snippet of that name, wherever it lives."""
    (body,) = [body for n, body, _ in marked(SNIPPET) if n == name]
    return body


def commands(body: str) -> list[str]:
    """The block's command lines, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", body)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_every_command_block_is_run_or_has_a_reason():
    marked_blocks = blocks()
    for path, text in PAGES.items():
        # every bash block of every page is marked (and an sh or console block is not allowed)
        code_blocks = re.findall(r"```(bash|sh|console)\n", text)
        in_page = [n for n, (lang, _, page) in marked_blocks.items() if page == path and lang == "bash"]
        assert len(in_page) == len(code_blocks), path.name
    runnable = {n for n, (lang, _, _) in marked_blocks.items() if lang == "bash"} - set(ELSEWHERE)
    assert runnable == set(RUN_HERE), runnable ^ set(RUN_HERE)
    assert set(ELSEWHERE) <= set(marked_blocks)


def test_every_python_block_is_a_snippet_that_runs():
    """Every python block of every page is a marked snippet, names unique, and
    each has its test below."""
    names = [name for name, _, _ in marked(SNIPPET)]
    assert len(names) == len(set(names)), names
    for path, text in PAGES.items():
        assert len(re.findall(r"```python\n", text)) == len([1 for *_, p in marked(SNIPPET) if p == path]), path.name
    assert set(names) == {"read", "read-full", "numpy-short", "numpy", "torch"}


def test_the_readme_links_only_to_files_that_exist():
    """The README's relative links (into docs/ among them) resolve; the docs'
    own links are checked by mkdocs build --strict (tests/test_docs.py)."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT)
    local = [link for link in links if not re.match(r"\w+://", link)]
    assert local and [link for link in local if not (ROOT / link).exists()] == []


def run_readme_line(line: str) -> int:
    """`./run.sh ARGS` or `master-poc-preprocess ARGS` as printed, in this
    process (the same parsing and code; no stage process)."""
    argv = shlex.split(line)
    assert argv[0] in ("./run.sh", "master-poc-preprocess", ".venv/bin/master-poc-preprocess"), line
    return cli.main(argv[1:] + [INMEM], supervised=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder laid out as the README's commands expect it."""
    monkeypatch.chdir(tmp_path)
    ids = list(range(1, 11)) + [17, 22]
    sample.write_sample("data/vital-files", ids, 1200)
    os.replace("data/vital-files/clinical_data.csv", "data/clinical_data.csv")
    return tmp_path


def run_real_data(workdir, capsys, monkeypatch):
    (line,) = commands(blocks()["real-data"][1])
    assert run_readme_line(line) == 0
    meta = json.load(open("out/preprocessing_metadata.json"))
    assert meta["cases"]["requested"] == 12 and len(meta["cases"]["ok"]) == 12


def run_config(workdir, capsys, monkeypatch):
    Path("run.yaml").write_text(blocks()["config-file"][1])
    first, second = commands(blocks()["config-run"][1])
    assert run_readme_line(first) == 0
    meta = json.load(open("out-v2/preprocessing_metadata.json"))
    assert meta["settings"]["emit_delta"] is True and meta["settings"]["tracks"]["name"].startswith("Philips")
    assert meta["config"]["cases"] == "1-10,17,22"
    assert run_readme_line(second) == 0
    assert json.load(open("out-h5/preprocessing_metadata.json"))["settings"]["horizon"] == 5
    (rebuild,) = commands(blocks()["rebuild"][1])
    assert run_readme_line(rebuild) == 0
    assert split_bytes("out-v2-rebuilt") == split_bytes("out-v2")


def run_trackmap(workdir, capsys, monkeypatch):
    sample.write_sample("data/intellivue-files", [1, 2, 3], 1200, rename=TO_INTELLIVUE)
    (line,) = commands(blocks()["trackmap"][1])
    assert run_readme_line(line) == 0
    q = json.load(open("out-icu/report/quality.json"))
    assert q["features"][0]["sources"]["Intellivue/HR"] == 1.0


def run_vitaldb(workdir, capsys, monkeypatch):
    """The open dataset from its web API: a stand-in for the API on loopback."""
    from webstandin import StandIn

    from pipeline.io.sources import VITALDB_API_ENV
    sample.write_sample("api-files", list(range(1, 21)), 900)
    (line,) = commands(blocks()["vitaldb"][1])
    with StandIn("api-files") as api:
        monkeypatch.setenv(VITALDB_API_ENV, api.url)
        assert run_readme_line(line) == 0
    meta = json.load(open("output/preprocessing_metadata.json"))
    assert meta["input"] == "vitaldb" and meta["cases"]["ok"] == list(range(1, 21))
    assert meta["transfer"]["cases"] == 20 and meta["split"]["by"] == "patient"


def run_estimate(workdir, capsys, monkeypatch):
    """The estimate from a pilot: ./run.sh's sample output stands for it."""
    from launch import launcher
    run_readme_line("./run.sh --input data/vital-files --clinical data/clinical_data.csv --output output")
    (line,) = commands(blocks()["estimate"][1])
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/master-poc-launch"
    capsys.readouterr()
    assert launcher.main(argv[1:]) == 0
    text = capsys.readouterr().out
    assert "3000 cases on 6 x ml.m5.2xlarge" in text and "cost on spot" in text and "within 1 h 00 min" in text


def run_portable(workdir, capsys, monkeypatch):
    (line,) = commands(blocks()["portable"][1])
    assert run_readme_line(line) == 0
    assert json.load(open("out-portable/preprocessing_metadata.json"))["status"] == "complete"


def run_shares(workdir, capsys, monkeypatch):
    """Each scheduler's index, converted as the recipe does, gives shares 1..6."""
    for name, var, first in (("share-kubernetes", "JOB_COMPLETION_INDEX", 0),
                             ("share-batch", "AWS_BATCH_JOB_ARRAY_INDEX", 0),
                             ("share-slurm", "SLURM_ARRAY_TASK_ID", 0)):
        (line,) = commands(blocks()[name][1])
        shares = []
        for index in range(first, first + 6):
            env = dict(os.environ, **{var: str(index)}, SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="6")
            echoed = subprocess.run(["bash", "-c", "echo " + line], capture_output=True, text=True, env=env).stdout
            argv = shlex.split(echoed)
            req = cli.parse_request(argv[1:])
            shares.append(str(req.options.share))
        assert shares == [f"{i}/6" for i in range(1, 7)], name


def run_launch(workdir, capsys, monkeypatch):
    """The launch commands through --dry-run, with the README's variables."""
    env = dict(os.environ, REPO="123456789012.dkr.ecr.eu-north-1.amazonaws.com/master-poc-preprocess",
               ACCOUNT="123456789012", REGION="eu-north-1", KMS="arn:aws:kms:eu-north-1:123456789012:key/k",
               SAGEMAKER_VALIDATE_ROLE="false")
    from launch import launcher
    Path("run.yaml").write_text(blocks()["config-file"][1])
    lines = (commands(blocks()["launch"][1]) + commands(blocks()["launch-config"][1])
             + commands(blocks()["launch-vitaldb"][1]))
    common = next(line for line in lines if line.startswith("COMMON="))
    requests = []
    for line in lines:
        if line.startswith("COMMON="):
            continue
        expanded = subprocess.run(["bash", "-c", f"{common}; echo {line}"], capture_output=True, text=True,
                                  env=env).stdout
        argv = shlex.split(expanded)
        assert argv[0] == ".venv/bin/master-poc-launch"
        argv = [a for a in argv[1:] if a != "--wait"] + (["--dry-run"] if "--dry-run" not in argv else [])
        capsys.readouterr()
        assert launcher.main(argv) == 0, capsys.readouterr().err
        requests.append(json.loads(capsys.readouterr().out))
    assert [r["ResourceConfig"]["InstanceCount"] for r in requests] == [2, 2, 6, 6, 6]
    assert requests[4]["HyperParameters"]["input"] == "vitaldb"
    assert requests[2]["VpcConfig"] == {"Subnets": ["subnet-0123abcd", "subnet-4567ef01"],
                                        "SecurityGroupIds": ["sg-0a1b2c3d"]}
    assert requests[3]["HyperParameters"]["tracks"] == "intellivue"


def run_cohort(workdir, capsys, monkeypatch):
    """The cohort run on the generated sample: the flow it prints is the README's."""
    (line,) = commands(blocks()["cohort"][1])
    capsys.readouterr()
    assert run_readme_line(line) == 0
    text = capsys.readouterr().out
    meta = json.load(open("cohort-out/preprocessing_metadata.json"))
    c = meta["cohort"]
    assert [(r["kind"], r["text"]) for r in c["criteria"]] == [
        ("include", "age >= 18"), ("include", "ane_type == 'General'"),
        ("require", "Propofol_INF,Remifentanil_INF"), ("min_measured", "BP_MAP=0.3")]
    assert c["requested"] == 20 and c["selected"] == 20 - sum(len(r["excluded"]) for r in c["criteria"])
    assert commands(blocks()["cohort-docs"][1]) == [line]  # docs/cohort.md shows the README's run
    shown = [(path, out) for path, page in PAGES.items()
             for out in re.findall(r"<!-- cohort-output -->\s*```text\n(.*?)```", page, re.S)]
    assert {path.name for path, _ in shown} == {"README.md", "cohort.md"}
    for path, out in shown:
        checked = [row for row in out.splitlines() if "left out by" in row or "selected and processed" in row]
        assert len(checked) == 5, path.name
        for row in checked:
            assert row.strip() in text, (path.name, row)


RUN_HERE = {"cohort": run_cohort, "cohort-docs": run_cohort, "real-data": run_real_data, "config-run": run_config,
            "rebuild": run_config, "trackmap": run_trackmap,
            "portable": run_portable, "share-kubernetes": run_shares, "share-batch": run_shares,
            "share-slurm": run_shares, "launch": run_launch, "launch-config": run_launch,
            "launch-vitaldb": run_launch, "vitaldb": run_vitaldb, "estimate": run_estimate}


@pytest.mark.parametrize("runner", sorted(set(RUN_HERE.values()), key=lambda f: f.__name__),
                         ids=lambda f: f.__name__)
def test_readme_block_runs_as_printed(runner, workdir, capsys, monkeypatch):
    runner(workdir, capsys, monkeypatch)


def test_runner_blocks_pass_their_beam_flags_through():
    dataflow, flink = commands(blocks()["runners"][1])
    req = cli.parse_request(shlex.split(dataflow)[1:])
    assert list(req.beam_args) == ["--runner", "DataflowRunner", "--project", "my-project", "--region",
                                   "europe-west1", "--temp_location", "gs://bucket/tmp", "--setup_file", "./setup.py"]
    req = cli.parse_request(shlex.split(flink)[1:])
    assert list(req.beam_args) == ["--runner", "FlinkRunner", "--flink_master", "localhost:8081",
                                   "--environment_type", "LOOPBACK", "--setup_file", "./setup.py"]


def test_every_declared_option_is_in_the_readme_or_the_docs():
    """Every flag is named, as `--flag`, in the README or a docs page (the
    options page, docs/options.md, lists them all)."""
    from dataclasses import fields

    from pipeline.options import RunOptions
    from transforms.settings import Settings, flag_names
    everything = "\n".join(PAGES.values())
    for f in list(fields(Settings)) + list(fields(RunOptions)):
        for flag in flag_names(f):
            if not flag.startswith("--"):
                continue  # -v: --verbose is there
            assert f"`{flag}`" in everything, f.name


def run_snippet(name: str, out: str) -> dict:
    """Runs the snippet on the output `out`: its `out = "output"`, or the
    "output" it passes to OutputReader, is replaced by that path."""
    block = snippet(name)
    if 'out = "output"' in block:
        block = block.replace('out = "output"', f"out = {out!r}")
    else:
        assert 'OutputReader("output"' in block, name
        block = block.replace('OutputReader("output"', f"OutputReader({out!r}")
    ns: dict = {}
    exec(compile(block, f"snippet:{name}", "exec"), ns)
    return ns


def test_readme_numpy_snippet_runs(run_output, capsys):
    """The README's three lines of the reader."""
    run_snippet("numpy-short", run_output[1])
    assert "(64, 300, 16) (64, 6) (64, 8)" in capsys.readouterr().out
    assert len(snippet("numpy-short").strip().splitlines()) == 3


def test_docs_numpy_snippet_runs(run_output, capsys):
    ns = run_snippet("numpy", run_output[1])
    assert "(64, 300, 16) (64, 6) (64, 8)" in capsys.readouterr().out
    meta = json.load(open(f"{run_output[1]}/preprocessing_metadata.json"))
    assert ns["n"] == meta["splits"]["validation"]["windows"]


def test_docs_pytorch_snippet_runs(run_output, capsys):
    pytest.importorskip("torch", reason="PyTorch is not installed: .ci/run installs its CPU build from a wheel on "
                                        "the machine's disk; from the registry it pulls the CUDA libraries (GBs)")
    run_snippet("torch", run_output[1])
    assert "torch.Size([64, 300, 16]) torch.Size([64, 8])" in capsys.readouterr().out


def test_readme_reading_snippet_runs(run_output, capsys):
    run_snippet("read", run_output[1])
    assert "(64, 300, 16) (64, 6) (64, 8)" in capsys.readouterr().out


def test_docs_reading_snippet_runs(run_output, capsys):
    """docs/reading.md's TensorFlow example, back to clinical units."""
    ns = run_snippet("read-full", run_output[1])
    assert "(64, 300, 16) (64, 6) (64, 8)" in capsys.readouterr().out
    prop = ns["propofol"].numpy()
    assert prop.shape == (64,) and (prop >= 0).all() and (prop <= 12).all()
