"""The import contracts in pyproject.toml (import-linter): one-way layers, the reference a leaf, no cycles."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))

pytestmark = pytest.mark.skipif(not Path(LINT).exists(), reason="import-linter is not installed (dev extra)")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": ""}, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_import_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("engine/llm.py", "from ..generation import engine_for", "Layers"),
    ("kernels/norms.py", "from ..engine import LLM", "Layers"),
    ("passes.py", "from .reference import fill_latents", "Only the command line"),
    ("reference.py", "from .tokens import LATENT", "The reference imports nothing"),
    ("engine/sequence.py", "from .scheduler import Scheduler", "No import cycle"),
])
def test_a_planted_back_edge_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "coconut_fast", tmp_path / "coconut_fast", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "coconut_fast" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    result = lint(tmp_path)
    assert result.returncode != 0 and broken in result.stdout.split("Broken contracts")[-1], result.stdout
