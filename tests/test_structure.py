"""The code's shape: no import cycle among the project's modules (imports
inside functions included), transforms never imports pipeline or launch, and
no module of the product refers to files outside the repository."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "transforms", "launch")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> list[pathlib.Path]:
    """Every module of the product, sub-packages included."""
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module a file imports (inside functions too), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def project_imports() -> dict[str, set[str]]:
    graph = {module_name(p): imports_of(p) for p in project_modules()}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = project_imports()
    assert len(graph) > 20 and graph["pipeline.cli"]  # the graph really was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # and the check finds one when there is one
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_transforms_is_the_bottom_layer():
    graph = project_imports()
    upward = {m: sorted(d for d in deps if not d.startswith("transforms")) for m, deps in graph.items()
              if m.startswith("transforms")}
    assert all(not v for v in upward.values()), upward


# What pure code never imports: files, networks and stores are pipeline.io's.
IO_MODULES = ("apache_beam", "boto3", "botocore", "urllib", "http", "socket", "requests", "vitaldb", "shutil",
              "tempfile", "subprocess", "glob", "io", "gzip")


def test_transforms_is_pure_numpy_in_numpy_out():
    """No file, network or store access in transforms/: none of their modules is imported there."""
    found = {module_name(p): sorted(n for n in imports_of(p) if n.split(".")[0] in IO_MODULES)
             for p in (ROOT / "transforms").rglob("*.py")}
    assert {m: v for m, v in found.items() if v} == {}
    # and the check sees an import when there is one
    assert "apache_beam.io.filesystems" in imports_of(ROOT / "pipeline" / "io" / "sources.py")


def test_every_io_library_is_used_in_one_package_only():
    """Stores and servers are reached from pipeline.io alone (and the tools' and launcher's own needs)."""
    allowed = ("pipeline.io", "launch", "pipeline.tools")
    for p in project_modules():
        m = module_name(p)
        if m.startswith(allowed):
            continue
        net = sorted(n for n in imports_of(p) if n.split(".")[0] in ("boto3", "botocore", "urllib", "http", "vitaldb"))
        assert net == [], (m, net)


def test_no_reference_to_files_outside_the_repository():
    offenders = []
    for path in [p for d in PACKAGES + ("tests", "scripts") for p in (ROOT / d).rglob("*.py")] + \
            [ROOT / "README.md", ROOT / "Dockerfile", ROOT / "setup.py"] + list((ROOT / "docs").glob("*.md")):
        text = path.read_text()
        for pattern in (r"\.\./shared", r"\b(SPEC|DESIGN|VITALDB|BEAM_NOTES|IMAGE_NOTES|STYLE)\.md\b"):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_the_package_carries_what_it_reads_at_run_time(tmp_path):
    """What pip installs (the image) and what --setup_file ships to remote
    workers hold the shipped track maps and requirements.txt, not only the
    code (an installed package without them failed at import)."""
    import subprocess
    import sys
    import tarfile
    import zipfile

    from conftest import copy_repo
    src = copy_repo(tmp_path / "src")  # a copy: building writes build/ and *.egg-info next to setup.py
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "transforms/trackmaps/intellivue.yaml" in names and "pipeline/api.py" in names
    assert "launch/prices.json" in names
    assert not [n for n in names if n.startswith("tests/")]
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")], cwd=src,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (sdist,) = (tmp_path / "sdist").glob("*.tar.gz")
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    assert {"requirements.txt", "transforms/trackmaps/intellivue.yaml", "launch/prices.json", "setup.py"} <= members


def layout_modules() -> set[str]:
    """The modules the README's Layout section names: folder lines end in
    "/", nesting by two spaces of indent; a line may name several files."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    block = re.search(r"```\n(.*?)```", layout, re.S).group(1)
    stack: list[str] = []
    named = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip(" "))) // 2
        head = line.strip().split("  ")[0]
        stack = stack[:indent]
        folder = re.match(r"^([\w]+)/", head)
        if folder and "," not in head and not head.endswith(".py"):
            stack.append(folder.group(1))
            continue
        for name in re.findall(r"\b([\w]+\.py)\b", head):
            named.add("/".join(stack + [name]))
    return named


def test_the_readmes_layout_names_every_module_and_only_real_ones():
    modules = {str(p.relative_to(ROOT)) for p in project_modules() if p.name != "__init__.py"}
    named = layout_modules()
    assert modules - named == set(), "modules missing from the README's Layout"
    assert {n for n in named if n.split("/")[0] in PACKAGES} - modules == set(), "named but not there"
    assert "pipeline/io/sources.py" in named  # sub-packages are walked


def test_units_are_small():
    """No class over 120 lines, no function over 60 (docstrings included): one
    idea each, readable in one screen."""
    too_long = []
    for p in project_modules():
        for n in ast.walk(ast.parse(p.read_text())):
            limit = 120 if isinstance(n, ast.ClassDef) else 60 if isinstance(n, (ast.FunctionDef,
                                                                                 ast.AsyncFunctionDef)) else 0
            if limit and n.end_lineno - n.lineno + 1 > limit:
                too_long.append(f"{p.relative_to(ROOT)}: {n.name} {n.end_lineno - n.lineno + 1} lines")
    assert too_long == []
