"""The layer contracts of pyproject.toml (import-linter) hold, and they do catch what
they are there for: a problem package importing another, a function-level import that
climbs a layer, and an import cycle."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
lint = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(lint is None, reason="import-linter is not installed (pip install -e '.[test]')")


def run_lint(src: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(src), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    return subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=src, env=env,
                          capture_output=True, text=True)


def test_contracts_hold():
    r = run_lint(ROOT / "src")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("path, code, broken", [
    # a problem package reaching into another, inside a function
    ("difflab/t2i/_probe.py", "def f():\n    from difflab.digits import generate\n", "layers"),
    # the core reaching up to a problem package
    ("difflab/sampling_probe.py", "", None),
    ("difflab/guidance.py", "\ndef _probe():\n    from difflab.faces import generate\n", "layers"),
    # a cycle between two modules of one package
    ("difflab/personalize/templates.py", "\ndef _probe():\n    from difflab.personalize import textual_inversion\n", "acyclic"),
])
def test_contracts_catch_violations(tmp_path, path, code, broken):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "difflab", src / "difflab", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.json", "*.txt", "*.md"))
    target = src / path
    target.write_text((target.read_text() if target.exists() else "") + code)
    r = run_lint(src)
    if broken is None:  # a harmless new module keeps every contract
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        assert r.returncode != 0, r.stdout
        assert "1 broken" in r.stdout
        name = {"layers": "cli > problem packages", "acyclic": "no import cycles"}[broken]
        assert f"{name}" in r.stdout.split("Broken contracts")[1]
