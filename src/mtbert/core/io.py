"""File writes that are atomic (a reader never sees a half-written file, a crash never leaves
one), strict JSON, and file checksums."""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


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


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """A file opened beside `path`; on success it is fsynced and renamed over `path`, on any error
    it is deleted and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
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
