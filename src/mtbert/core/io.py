"""File writes that are atomic (a reader never sees a half-written file, a crash never leaves
one), directory replacement, temporaries a later writer can clean up, strict JSON, reading a run's
JSON and YAML files, text encodings, and file checksums."""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

import yaml

from mtbert.core.errors import CheckpointError


def text_encoding(name) -> str:
    """`name` if Python knows it as a text encoding (utf-8, latin-1, cp1252, utf-16, ...), else ValueError."""
    try:
        if isinstance(name, str) and codecs.lookup(name)._is_text_encoding:
            return name
    except LookupError:
        pass
    raise ValueError(f"{name!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252, utf-16)")


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (or directory) gets under this process's umask. mkstemp and mkdtemp
    create 0600 / 0700 instead, which would leave a renamed output private to its writer."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


# ---------------------------------------------------------------- temporaries and atomic replacement
# Every output is built in a hidden sibling named after it and the writer's process id, then
# renamed into place. Python removes the temporary on any exit it sees (exceptions, Ctrl-C, and
# SIGTERM, which the CLI turns into an exit); after a SIGKILL the next writer of the same output
# removes the temporaries whose writer is gone.

def temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def remove_stale_temporaries(path: Path) -> None:
    """Remove `path`'s temporaries left by writers that no longer run (killed before cleaning up)."""
    own = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)-")
    if not path.parent.is_dir():
        return
    for sibling in path.parent.iterdir():
        found = own.match(sibling.name)
        if found and not process_alive(int(found.group(1))):
            remove_path(sibling)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # (no such process; no such pid at all)
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_dir(dest: Path) -> Path:
    """A new hidden directory beside `dest` to build it in (mode by the umask)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=temporary_prefix(dest)))
    os.chmod(tmp, umask_mode(directory=True))
    return tmp


def replace_dir(new: Path, dest: Path, old: Path | None = None) -> None:
    """Rename directory `new` to `dest`. An existing `dest` is renamed to `old` first (a checkpoint's
    `best.old`, which readers fall back to after a crash; by default a temporary name) and removed
    once `new` is in place, so there is always one whole directory. Without `dest`, an existing
    `old` may be the only copy: it goes only after `new` is in place."""
    old = old if old is not None else dest.with_name(temporary_prefix(dest) + "old")
    if dest.exists() or dest.is_symlink():
        remove_path(old)  # stale: dest is newer
        os.replace(dest, old)
    os.replace(new, dest)
    remove_path(old)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """A file opened beside `path`; on success it is fsynced and renamed over `path`, on any error
    it is deleted and `path` is left as it was."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
    try:
        os.chmod(tmp, umask_mode())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": newline, "encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


MAX_RUN_FILE_BYTES = 256 * 1024 * 1024  # a run's JSON, YAML and tokenizer files are far smaller


def lies_under(path: str | Path, root: str | Path) -> bool:
    """Whether `path`, links and `..` resolved, is `root` or inside it (where a loaded run may
    read or write)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def read_run_text(path: str | Path, max_bytes: int = MAX_RUN_FILE_BYTES) -> str:
    """The text of a file a run directory holds: a regular file (not a device or pipe a link may
    point to), at most `max_bytes`, UTF-8; else one CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"{path} is larger than {max_bytes // 2**20} MB: not a file mtbert wrote")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"corrupt {path}: not UTF-8 text") from None


def read_json(path: str | Path, kind: type | None = None):
    """A JSON file of a run or export; corrupt, or not a `kind` where one is given, is one
    CheckpointError naming it."""
    return _read_parsed(path, json.loads, (ValueError, RecursionError), kind)  # (JSON/Unicode errors are ValueErrors)


def read_yaml(path: str | Path, kind: type | None = None):
    """A YAML file of a run (its config.yaml); corrupt, or not a `kind` where one is given, is one
    CheckpointError naming it."""
    return _read_parsed(path, yaml.safe_load, (ValueError, yaml.YAMLError, RecursionError), kind)


def _read_parsed(path: str | Path, parse, errors: tuple, kind: type | None):
    try:
        value = parse(read_run_text(path))
    except errors as e:
        raise CheckpointError(f"corrupt {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if kind is not None and not isinstance(value, kind):
        raise CheckpointError(f"corrupt {path}: expected a {kind.__name__}, got {type(value).__name__}")
    return value


def finite_json(obj):
    """`obj` with NaN and infinities as None: json.dumps would write bare NaN, which is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def to_json(obj, **options) -> str:
    """Strict JSON text of `obj` (numpy scalars as floats, non-finite numbers as null)."""
    return json.dumps(finite_json(json.loads(json.dumps(obj, default=float))), allow_nan=False, **options)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, to_json(obj, indent=2))


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
