"""MANIFEST.json beside CS224N prediction files, and `mtbert predict --verify DIR`.

`mtbert predict RUN --out DIR` writes the leaderboard files (sst-, para-, sts- {dev,test}-output.csv)
and a manifest: which run and config produced them, its seed, the source commit, the commands that
reproduce them, the sha256 of every file, and the dev metrics computed from the dev files themselves
(so from the values as written, rounded as the leaderboard reads them). An ensemble's manifest adds
`members` (each used member's seed and training command) and `commands.ensemble`.

`--verify DIR` checks a directory against its manifest: every file's hash, and the dev metrics
recomputed from the dev files against the dev labels of the data directory. Any difference is an
error naming the file or the metric, so committed predictions cannot drift from what RESULTS.md
reports.
"""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np

from mtbert import __version__
from mtbert.core.errors import DataError
from mtbert.core.io import read_json, read_run_text, read_yaml, sha256, write_json
from mtbert.core.rundir import RunDir
from mtbert.core.tasks import TaskSpec, register_tasks, run_tasks, with_overall
from mtbert.core.trust import reading_run
from mtbert.data.readers import load_split
from mtbert.inference.ensemble import is_ensemble_dir, used_members
from mtbert.modeling.checkpoint import find_checkpoint

MANIFEST = "MANIFEST.json"
FORMAT = 1
TOLERANCE = 1e-9  # recomputed from the same files: only float summation order can differ


def read_output_file(path: Path, task: TaskSpec) -> dict[str, float | int]:
    """A CS224N prediction file ("id , value" rows under its header line) as id -> value."""
    lines = read_run_text(path).splitlines()
    if not lines or not lines[0].startswith("id"):
        raise DataError(f"{path}: not a CS224N prediction file (no 'id' header)")
    values = {}
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        ex_id, sep, value = line.partition(",")
        try:
            values[ex_id.strip()] = float(value) if task.kind.scores else int(value)
            if not sep or not math.isfinite(float(value)):
                raise ValueError
        except ValueError:
            raise DataError(f"{path}: line {number} is not 'id , value'") from None
    return values


def dev_metrics_of_files(files: dict[str, str], out_dir: Path, tasks: dict[str, TaskSpec],
                         data_dir: Path) -> dict[str, float]:
    """The dev metrics of the dev prediction files (file name -> task name) against the dev labels."""
    metrics, extra = {}, {}
    for name, task_name in files.items():
        if "-dev-" not in name or not tasks[task_name].cs224n_output:  # (other tasks' files: hashed only)
            continue
        task = tasks[task_name]
        predicted = read_output_file(out_dir / name, task)
        examples = load_split(task, data_dir, "dev")[0]
        missing = [e.id for e in examples if e.id not in predicted]
        if missing:
            raise DataError(f"{out_dir / name}: no prediction for {len(missing)} dev example(s), e.g. {missing[:3]}")
        pred = np.array([predicted[e.id] for e in examples])
        gold = np.array([e.label for e in examples])
        for metric, value in task.all_metrics(pred, gold).items():
            (metrics if metric == task.main_metric else extra)[task_name if metric == task.main_metric
                                                              else f"{task_name}/{metric}"] = float(value)
    return {**with_overall(metrics), **extra}  # (overall: the leaderboard formula where it applies)


def source_commit() -> str | None:
    """The git commit of the mtbert source that runs (None outside a git checkout)."""
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(Path(__file__).parent), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _config_in(directory: Path) -> dict:
    """directory/config.yaml as a mapping ({} where there is none; a corrupt one: one CheckpointError)."""
    path = directory / "config.yaml"
    raw = read_yaml(path) if path.is_file() else None
    return raw if isinstance(raw, dict) else {}


def _checkpoint_origin(checkpoint: Path, config: dict) -> dict:
    """A checkpoint's training seed (from its `config`) and the command that started its run (None
    where not recorded)."""
    train = config.get("train")
    return {"seed": train.get("seed") if isinstance(train, dict) else None,
            "train": RunDir(RunDir.of_checkpoint(checkpoint)).read_command()}


def provenance(run_dir: Path) -> dict:
    """The manifest's record of the models behind the predictions: the `config` a run (or an ensemble)
    was made with; `seeds` and `commands.train` of a run; for an ensemble, `seeds` of the members in
    use, `members` (name -> its seed and training command; a kept epoch's is its run's) and
    `commands.ensemble`, the command that built it."""
    run_dir = Path(run_dir).resolve()
    if not is_ensemble_dir(run_dir):
        checkpoint = find_checkpoint(run_dir, required=False) or run_dir
        config = _config_in(checkpoint)
        origin = _checkpoint_origin(checkpoint, config)
        return {"config": config, "seeds": [origin["seed"]], "commands": {"train": origin["train"]}}
    members = {name: _checkpoint_origin(ckpt, _config_in(ckpt)) for name, ckpt in used_members(run_dir).items()}
    record = _config_in(run_dir)
    return {"config": record, "seeds": [m["seed"] for m in members.values()], "members": members,
            "commands": {"ensemble": record.get("command")}}


def write_manifest(out_dir: Path, files: dict[str, str], tasks: dict[str, TaskSpec], data_dir: Path, *,
                   run: str, origin: dict, predict_command: str) -> dict:
    """MANIFEST.json for the prediction `files` (name -> task) in `out_dir`; returns it. `origin`: what
    `provenance` gives (read before the files are written, so a bad record stops the command first)."""
    manifest = {
        "format": FORMAT, "mtbert": __version__, "source_commit": source_commit(), "run": run,
        "seeds": origin["seeds"], **({"members": origin["members"]} if "members" in origin else {}),
        "dev_metrics": dev_metrics_of_files(files, out_dir, tasks, data_dir),
        "files": {name: {"task": task, "sha256": sha256(out_dir / name)} for name, task in sorted(files.items())},
        "commands": {**origin["commands"], "predict": predict_command},
        "config": origin["config"],
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def verify(out_dir: Path, tasks_of, data_dir: Path) -> dict[str, float]:
    """Check `out_dir` against its MANIFEST.json; returns the recomputed dev metrics. `tasks_of`
    maps a task name to its TaskSpec. Any mismatch is a DataError naming the file or metric."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).is_file():
        raise DataError(f"{out_dir} has no {MANIFEST}: nothing to verify against")
    manifest = read_json(out_dir / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise DataError(f"{out_dir / MANIFEST}: not a format-{FORMAT} prediction manifest")
    files = {}
    for name, entry in manifest["files"].items():
        path = out_dir / name
        if Path(name).name != name or not isinstance(entry, dict):
            raise DataError(f"{out_dir / MANIFEST}: file entry {name!r} is not a plain file name with its record")
        if not path.is_file():
            raise DataError(f"{path}: listed in {MANIFEST} but missing")
        if sha256(path) != entry.get("sha256"):
            raise DataError(f"{path}: its sha256 differs from {MANIFEST}'s (the file changed)")
        files[name] = entry.get("task")
    extra = sorted(p.name for p in out_dir.iterdir() if p.name != MANIFEST and p.name not in files)
    if extra:
        raise DataError(f"{out_dir}: {extra} are not in {MANIFEST}")
    if not all(isinstance(t, str) for t in files.values()):
        raise DataError(f"{out_dir / MANIFEST}: every file entry needs the name of its task")
    definitions = (manifest.get("config") or {}).get("tasks") if isinstance(manifest.get("config"), dict) else None
    with reading_run(out_dir), run_tasks():  # the run's own task definitions, as data (core.trust)
        if isinstance(definitions, dict):
            # (a run's config maps a task to its definition; an ensemble's record maps it to the members used)
            register_tasks({k: v for k, v in definitions.items() if k in set(files.values()) and isinstance(v, dict)})
        tasks = {t: tasks_of(t) for t in set(files.values())}
        recomputed = dev_metrics_of_files(files, out_dir, tasks, data_dir)
    recorded = manifest.get("dev_metrics")
    if not isinstance(recorded, dict):
        raise DataError(f"{out_dir / MANIFEST}: dev_metrics must be a mapping of metric -> value")
    for key in sorted(set(recorded) | set(recomputed), key=lambda k: (k == "overall", k)):  # (the cause first)
        a, b = recorded.get(key), recomputed.get(key)
        fine = isinstance(a, (int, float)) and not isinstance(a, bool) and b is not None and math.isfinite(a) \
            and abs(a - b) <= TOLERANCE
        if not fine:
            raise DataError(f"{out_dir}: dev {key} recomputed from the files is {b}, {MANIFEST} says {a}")
    return recomputed
