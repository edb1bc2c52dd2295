"""The installed distribution claims one top-level name, histoserve, and runs every command the
docs and the manifests give, `python -m histoserve.<stage> ...`, without the repository's folders."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.k8s.manifests import KUSTOMIZATIONS, render_cached
from tests.parsing import locust_problem, parse_problem
from tests.stages import PACKAGES, SCRIPTS, STAGES


def build_wheel(folder) -> zipfile.Path:
    source = folder / "source"  # a copy: building in the checkout would leave build/ there
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = folder.glob("histoserve-*.whl")
    return wheel


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """The wheel unpacked into a site folder, and an empty working folder: commands run there with
    PYTHONPATH=site import the installed copy (the checkout's editable finder comes after PYTHONPATH)."""
    folder = tmp_path_factory.mktemp("installed")
    wheel = build_wheel(folder)
    zipfile.ZipFile(wheel).extractall(folder / "site")
    (folder / "elsewhere").mkdir()
    return folder


def run_installed(installed, *words, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed / "site")}
    return subprocess.run([sys.executable, *words], cwd=installed / "elsewhere", env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_installs_everything_under_histoserve_only(installed):
    [wheel] = installed.glob("histoserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"histoserve"}
    assert "histoserve/formats/contract.py" in names
    for stage in STAGES:
        assert f"histoserve/{stage}/__init__.py" in names
        assert f"histoserve/{stage}/__main__.py" in names
    assert "histoserve/serve/onnxruntime_model.py" in names  # the python-backend model serve copies
    assert "histoserve/loadtest/locustfile.py" in names  # python -m histoserve.loadtest locust runs it
    entry_points = zipfile.Path(wheel, next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).read_text()
    assert all(f"{script} = {target}" in entry_points for script, target in SCRIPTS.items())


def test_the_installed_copy_is_the_one_imported(installed):
    result = run_installed(installed, "-c", "import histoserve.client; print(histoserve.client.__file__)")
    assert result.stdout.strip().startswith(str(installed / "site")), result.stdout + result.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_runs_as_a_histoserve_module_outside_the_repository(installed, stage):
    result = run_installed(installed, "-m", f"histoserve.{stage}", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m histoserve.{stage}")


def test_every_stage_has_a_console_script_calling_its_main():
    assert sorted(SCRIPTS) == sorted(f"histoserve-{stage}" for stage in STAGES)
    for script, target in SCRIPTS.items():
        stage = script.removeprefix("histoserve-")
        assert target == f"histoserve.{stage}.__main__:main"
        assert re.search(r"^def main\(argv: list\[str\] \| None = None\) -> int:", (ROOT / stage / "__main__.py").read_text(),
                         flags=re.MULTILINE), f"{stage}/__main__.py: no main(argv)"


def test_every_stage_dispatches_its_subcommands_with_argparse():
    """One style: argparse subparsers, each setting `run`; no command looked up from argv by hand."""
    import importlib

    for stage in STAGES:
        parser = importlib.import_module(f"histoserve.{stage}.__main__").build_parser()
        subcommands = [action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"]
        for action in subcommands:
            for name, subparser in action.choices.items():
                assert callable(subparser.get_default("run")), f"{stage} {name}: sets no run"
        assert "sys.argv[1]" not in (ROOT / stage / "__main__.py").read_text()
        assert "importlib.import_module" not in (ROOT / stage / "__main__.py").read_text()


def test_the_image_copies_every_package_the_distribution_maps():
    """The wheel stage builds from the build context, so .dockerignore must leave every package folder
    in (`pip wheel .` fails on one it was not given: formats/ once); the images install that wheel."""
    mapped = set(re.findall(r'^"histoserve\.\w+" = "(\w+)"$', (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE))
    assert mapped == set(PACKAGES)
    stages = {re.match(r"\S+ AS (\S+)", stage).group(1): stage for stage in re.split(r"(?m)^FROM ", (ROOT / "Dockerfile").read_text())[1:]}
    # the context goes into the wheel stage only; every image installs the wheel (the listed packages, nothing else)
    assert [name for name, stage in stages.items() if re.search(r"^COPY \. ", stage, flags=re.MULTILINE)] == ["wheel"]
    assert "pip wheel" in stages["wheel"]
    for name in ("serve-tools", "triton", "full"):
        assert re.search(r'pip install .*"\$\(ls /\S+/histoserve-\*\.whl\)', stages[name]), name
    assert problems_of_dockerignore((ROOT / ".dockerignore").read_text()) == []


def problems_of_dockerignore(text: str) -> list[str]:
    """Patterns that would leave out what `pip install .` needs (a package folder, pyproject.toml,
    README.md, constraints.txt)."""
    needed = [*PACKAGES, "pyproject.toml", "README.md", "constraints.txt"]
    problems = []
    for line in text.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#") or pattern.startswith("!"):
            continue
        expression = pattern.strip("/").replace(".", r"\.").replace("**/", "(.*/)?").replace("*", "[^/]*")
        hit = [name for name in needed if re.fullmatch(expression, name)]
        problems += [f".dockerignore: {pattern!r} leaves out {name}" for name in hit]
    return problems


def test_the_dockerignore_check_sees_a_package_left_out():
    assert problems_of_dockerignore("tests\nmonitor\n") == [".dockerignore: 'monitor' leaves out monitor"]
    assert problems_of_dockerignore("*.toml\n") == [".dockerignore: '*.toml' leaves out pyproject.toml"]


# --- the manifests' commands, run against the installed package ---------------------------------

SHELLS = (["/bin/sh", "-c"], ["sh", "-c"], ["/bin/bash", "-c"], ["bash", "-c"])
PROGRAMS = {"python", "python3", "torchrun", "locust"}


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a `sh -c` script that start a program of PROGRAMS (after `exec` or
    variable assignments), as words: one line at a time, split at ; && || | ( )."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|()"):
                words = [w for w in segment if w != "exec"]
                start = next((i for i, w in enumerate(words) if Path(w).name in PROGRAMS), None)
                if start is not None and all("=" in w for w in words[:start]):
                    commands.append(words[start:])
                segment = []
            else:
                segment.append(token)
    return commands


def container_commands(objects: list[dict]) -> list[tuple[str, list[str]]]:
    """(where, words) of every command of every container and init container in `objects`."""
    found = []

    def visit(node, where: str) -> None:
        if isinstance(node, dict):
            for container in [*node.get("initContainers", []), *node.get("containers", [])] if "containers" in node else []:
                words = [*container.get("command", []), *container.get("args", [])]
                here = f"{where} container {container['name']}"
                if words[:2] in SHELLS:
                    found.extend((here, command) for command in shell_commands(words[2]))
                elif words:
                    found.append((here, words))
            for value in node.values():
                visit(value, where)
        elif isinstance(node, list):
            for value in node:
                visit(value, where)

    for thing in objects:
        visit(thing.get("spec", {}), f"{thing['kind']}/{thing['metadata']['name']}")
    return found


def command_problems(installed, where: str, words: list[str], helps: dict) -> list[str]:
    """Why the installed package could not run `words` ([] when it can): a module that is not
    `histoserve.<stage>`, a subcommand or an option its parser does not have."""
    import importlib

    program = Path(words[0]).name
    if program == "locust":
        return [f"{where}: `locust -f ...` needs the checkout's file: run `python -m histoserve.loadtest locust ...`"]
    if program not in PROGRAMS:
        return []
    if "-m" not in words:
        return [f"{where}: {program} without -m histoserve.<stage>: {' '.join(words)}"]
    module, rest = words[words.index("-m") + 1], words[words.index("-m") + 2:]
    stage = module.removeprefix("histoserve.")
    if not module.startswith("histoserve.") or stage not in STAGES:
        return [f"{where}: `-m {module}` is not an installed command (python -m histoserve.<stage>, {', '.join(STAGES)})"]
    parser = importlib.import_module(f"histoserve.{stage}.__main__").build_parser()
    names = {n for a in parser._actions if a.__class__.__name__ == "_SubParsersAction" for n in a.choices}
    head = [rest[0]] if rest and rest[0] in names else []
    if names and not head and rest and not rest[0].startswith("-"):
        return [f"{where}: `{module} {rest[0]}`: no such command (it has {', '.join(sorted(names))})"]
    options = rest[len(head):]
    options = options[:options.index("--")] if "--" in options else options  # then only operands
    if head == ["locust"]:  # Locust parses with the packaged locustfile's options; --list stops before any load
        problem = locust_problem(options, site=installed / "site", cwd=installed / "elsewhere")
        return [] if problem is None else [f"{where}: {' '.join(words)}: {problem}"]
    key = (module, *head)
    if key not in helps:
        helps[key] = run_installed(installed, "-m", *key, "--help")
    if helps[key].returncode != 0:
        return [f"{where}: `python -m {' '.join(key)} --help` fails: {helps[key].stderr.strip()[-300:]}"]
    unknown = [w.split("=")[0] for w in options if w.startswith("--")
               and not re.search(rf"(?<![\w-]){re.escape(w.split('=')[0])}(?![\w-])", helps[key].stdout)]
    problems = [f"{where}: `python -m {' '.join(key)}` has no option {option}" for option in unknown]
    if not problems and (problem := parse_problem(stage, rest)):  # the installed help lists it: does it parse?
        problems.append(f"{where}: {' '.join(words)}: {problem}")
    return problems


@pytest.fixture(scope="module")
def helps() -> dict:
    return {}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_command_runs_with_the_installed_package(installed, helps, kustomization):
    commands = container_commands(render_cached(kustomization))
    problems = [p for where, words in commands for p in command_problems(installed, where, words, helps)]
    assert problems == []


def test_the_rendered_commands_include_every_stage_the_cluster_runs():
    """The check above sees the commands inside `sh -c` scripts and torchrun's too."""
    seen = {w[w.index("-m") + 1] for k in KUSTOMIZATIONS for _, w in container_commands(render_cached(k)) if "-m" in w}
    assert {"histoserve.serve", "histoserve.export", "histoserve.client", "histoserve.train", "histoserve.monitor",
            "histoserve.loadtest"} <= seen


@pytest.mark.parametrize("words, expected", [
    (["python", "-m", "monitor", "serve"], "`-m monitor` is not an installed command"),
    (["torchrun", "--nnodes=2", "-m", "train", "fit"], "`-m train` is not an installed command"),
    (["python", "-m", "histoserve.monitor", "serve", "--no-such-option=1"], "has no option --no-such-option"),
    (["python", "-m", "histoserve.serve", "stag", "--store", "/store"], "`histoserve.serve stag`: no such command"),
    (["python", "-m", "histoserve.export", "/runs/checkpoint.pt", "--nmae", "digits"], "has no option --nmae"),
    (["locust", "-f", "loadtest/locustfile.py", "--worker"], "needs the checkout's file"),
    (["python", "-m", "histoserve.loadtest", "locust", "--worker", "--triton-urll=x"], "unrecognized arguments: --triton-urll=x"),
    (["python", "script.py"], "without -m histoserve.<stage>"),
    (["python", "-m", "histoserve.serve", "golden-gate", "--model", "m", "--version", "0"], "--version: must be at least 1"),
])
def test_the_command_check_refuses_what_the_package_cannot_run(installed, helps, words, expected):
    [problem] = command_problems(installed, "Job/x container y", words, helps)
    assert expected in problem


def test_commands_are_found_inside_shell_scripts():
    script = """if [ "$JOB_COMPLETION_INDEX" = 0 ]; then
      run="/reports/x" && mkdir -p "$run" && echo "reports: $run"
      exec python -m histoserve.loadtest locust --master \\
        --csv="$run/locust"
    else
      SHARD=1 python -m histoserve.client slide a.svs --out=/r | tee log; aws s3 cp x y
    fi"""
    assert shell_commands(script) == [["python", "-m", "histoserve.loadtest", "locust", "--master", "--csv=$run/locust"],
                                      ["python", "-m", "histoserve.client", "slide", "a.svs", "--out=/r"]]
