"""`mtbert export`: Hugging Face, sentence-transformers and ONNX round trips, model cards, refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import mtbert
from mtbert.apps.cli import main
from mtbert.apps.export import EXPORT_MARKER
from mtbert.core.config import load_config
from mtbert.core.errors import CheckpointError
from mtbert.data.readers import Example, pad
from mtbert.inference.ensemble import ENSEMBLE_FILE
from mtbert.inference.loading import load_predictor
from mtbert.inference.onnx_runner import INPUT_KEYS
from mtbert.inference.predictor import evaluate_examples, load_examples
from mtbert.modeling.checkpoint import build_model, load_checkpoint, save_checkpoint
from mtbert.training.techniques import build_techniques
from tests.conftest import TINY_YAML

# Every input slot an ONNX graph can have: single sentences, bi-encoded and cross+cos pairs.
RUN = ["train.max_steps=2", "data.limit=16", "model.pooling=mean", "model.pair_encoding={qqp: bi, sts: cross+cos}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_data_dir):
    out = tmp_path_factory.mktemp("export") / "run"
    args = ["train", "--config", str(TINY_YAML), "--out", str(out), "--data-dir", str(synthetic_data_dir)]
    assert main(args + [a for s in RUN for a in ("--set", s)]) == 0
    return out


@pytest.fixture(scope="module")
def dev(run, synthetic_data_dir):
    return load_examples(["sst", "qqp", "sts"], synthetic_data_dir, "dev", 23)


def _checkpoint(tmp_path, *overrides, tweak=None):
    """A checkpoint of an untrained tiny model (fast) with these config overrides."""
    cfg = load_config(TINY_YAML, list(overrides))
    model, tok = build_model(cfg)
    for tech in build_techniques(cfg.techniques):
        tech.prepare_model(model, cfg.model.finetune)
    if tweak:
        tweak(model)
    return save_checkpoint(tmp_path / "ckpt", model, tok, cfg, {"step": 0, "dev": {"sst": 0.25}})


def our_embeddings(run_dir, texts) -> np.ndarray:
    """The run's pooled sentence vectors through the public API."""
    return mtbert.load(run_dir, device="cpu", precision="fp32").embed(texts)


def _card(out):
    text = (out / "README.md").read_text()
    assert f'"{out.name}"' in text and ".tmp" not in text  # the snippets name the export, not its temporary folder
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


# ---------------------------------------------------------------- hf

def test_hf_export_loads_in_transformers_with_our_hidden_states_and_heads(run, dev, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from mtbert.modeling.hf_format import load_hf_export

    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    model, tok, cfg, meta = load_checkpoint(run)
    theirs, their_tok = AutoModel.from_pretrained(str(out)).eval(), AutoTokenizer.from_pretrained(str(out))
    texts = [e.texts[0] for e in dev["sst"]] + ["word " * 100]  # one truncated at max_length
    ours = pad(tok.encode(texts), tok.pad_id)
    enc = their_tok(texts, padding=True, truncation=True, max_length=cfg.model.max_length, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ours["input_ids"]) and torch.equal(enc["attention_mask"], ours["attention_mask"])
    a, b = [e.texts[0] for e in dev["qqp"]], [e.texts[1] for e in dev["qqp"]]
    pairs = their_tok(a, b, truncation=True, max_length=cfg.model.max_length)  # one is truncated
    assert pairs["input_ids"] == [ids for ids, _ in tok.encode_pairs(a, b)]
    with torch.inference_mode():
        got = theirs(**enc).last_hidden_state
        ref = model.encoder(ours["input_ids"], ours["attention_mask"], ours["token_type_ids"])["last_hidden_state"]
    real = ours["attention_mask"].bool()
    assert (got[real] - ref[real]).abs().max() < 1e-4

    # the heads file + loader give back the whole multitask model
    loaded, loaded_tok = load_hf_export(out)
    from mtbert.inference.predictor import Predictor
    for task, examples in dev.items():
        x = Predictor(model, tok).predict(task, examples)["logits"]
        y = Predictor(loaded, loaded_tok).predict(task, examples)["logits"]
        assert np.abs(x - y).max() < 1e-4, task

    header, body = _card(out)
    assert header["library_name"] == "transformers"
    results = {r["dataset"]["type"]: r["metrics"][0]["value"] for r in header["model-index"][0]["results"]}
    assert results == {t: round(meta["dev"][t], 4) for t in ("sst", "qqp", "sts")}
    assert "Quora duplicate-question pairs" in body and "all-mpnet-base-v2" in body
    assert "mtbert train --config" in body and f"--out {run}" in body  # the recorded command
    assert "pair_encoding:" in body  # the training config
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


# ---------------------------------------------------------------- sentence-transformers

@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_encode_equals_our_embeddings(run, dev, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    src = run if pooling == "mean" else _checkpoint(tmp_path, "model.pooling=cls")
    out = tmp_path / "st"
    assert main(["export", str(src), "--format", "sentence-transformers", "--out", str(out)]) == 0
    texts = [e.texts[0] for e in dev["sst"]] + ["word " * 100]
    got = SentenceTransformer(str(out), device="cpu").encode(texts, batch_size=7)  # other batches than ours
    ref = our_embeddings(src, texts)
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.9999
    assert _card(out)[0]["library_name"] == "sentence-transformers"


# ---------------------------------------------------------------- onnx

@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--quantize", "int8"]) == 0
    return out


def _items(examples):
    return [e.texts[0] if len(e.texts) == 1 else tuple(e.texts) for e in examples]


def test_onnx_writes_the_encoder_once_and_each_task_matches_pytorch(run, dev, onnx_export):
    from mtbert.inference.onnx_predictor import OnnxPredictor
    from mtbert.inference.onnx_runner import OnnxModel, Tokenizer, graph_files
    from mtbert.inference.onnx_runner import pad as runner_pad

    out = onnx_export
    manifest = json.loads((out / "mtbert_onnx.json").read_text())
    assert manifest["format"] == 2
    assert manifest["tasks"]["qqp"]["slots"] == ["a", "b"] and manifest["tasks"]["sts"]["slots"] == ["pair", "a", "b"]
    # one encoder per variant, shared by every task; each task adds a head graph of a few kB
    graphs = sorted(str(p.relative_to(out)) for p in out.rglob("*.onnx"))
    assert graphs == ["encoder.int8.onnx", "encoder.onnx", "heads/qqp.onnx", "heads/sst.onnx", "heads/sts.onnx"]
    assert {spec["encoder"] for spec in manifest["tasks"].values()} == {"encoder"}
    encoder_bytes = (out / "encoder.onnx").stat().st_size
    assert all((out / "heads" / f"{t}.onnx").stat().st_size < 0.02 * encoder_bytes for t in manifest["tasks"])

    predictor = load_predictor(run, device="cpu", precision="fp32")
    runner = OnnxModel(out)
    for task, examples in dev.items():
        ref = predictor.predict(task, examples)
        for batch_size in (1, 4, 23):  # export example: batch 2; lengths vary with every batch
            runner.batch_size = batch_size
            got = runner.predict(task, _items(examples))
            assert np.abs(got["logits"] - ref["logits"]).max() < 1e-4, (task, batch_size)
            assert np.allclose(got["pred"], ref["pred"], atol=1e-4) and np.allclose(got["prob"], ref["prob"], atol=1e-4)

    # the runner tokenizes exactly as mtbert does, truncation included
    _, tok, _, _ = load_checkpoint(run)
    short_ours = type(tok)(tok.tok, max_length=12)
    short_theirs = Tokenizer(out / "tokenizer.json", 12)
    a, b = [e.texts[0] for e in dev["qqp"]], [e.texts[1] for e in dev["qqp"]]
    assert [s[0] for s in short_theirs.encode(a)] == [ids for ids, _ in short_ours.encode(a)]
    theirs_pairs = [runner_pad([s], 0) for s in short_theirs.encode_pairs(a, b)]
    ours_pairs = [pad([s], 0) for s in short_ours.encode_pairs(a, b)]
    assert all(torch.equal(torch.as_tensor(x["input_ids"]), y["input_ids"])
               and torch.equal(torch.as_tensor(x["token_type_ids"]), y["token_type_ids"])
               for x, y in zip(theirs_pairs, ours_pairs))

    # int8: a quantised encoder (the heads are shared), usable through the predictor interface
    assert (out / "encoder.int8.onnx").stat().st_size < 0.6 * encoder_bytes
    assert set(graph_files(manifest, "int8")) - set(graph_files(manifest, "fp32")) == {"encoder.int8.onnx"}
    fp32, _ = evaluate_examples(OnnxPredictor(out), dev)
    ours, _ = evaluate_examples(predictor, dev)
    assert fp32 == pytest.approx(ours, abs=1e-6)
    int8, _ = evaluate_examples(OnnxPredictor(out, "int8"), dev)
    assert set(int8) == set(ours) and all(np.isfinite(v) for v in int8.values())

    # runner.py in the export needs neither mtbert nor torch on the path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "runner.py", ".", "sts", "A man plays.", "A man is playing."], cwd=out,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["task"] == "sts"
    assert _card(out)[0]["library_name"] == "onnx"


class _WholeTaskGraph(torch.nn.Module):
    """What exports wrote before the encoder was stored once: encoder + one task's head in one graph."""

    def __init__(self, model, task, n_slots):
        super().__init__()
        self.model, self.task, self.n_slots = model, task, n_slots

    def forward(self, *tensors):
        inputs = [dict(zip(INPUT_KEYS, tensors[3 * k: 3 * k + 3])) for k in range(self.n_slots)]
        logits = self.model(self.task, inputs).float()
        kind = self.model.tasks[self.task].kind
        return logits, kind.predict(logits), kind.probabilities(logits)


def _old_layout_export(run, out):
    """An ONNX export in the first layout (manifest format 1): one full graph per task, TASK.onnx."""
    from mtbert.apps import export

    model, tok, _, meta = load_checkpoint(run)
    model.eval()
    out.mkdir()
    tasks, files = {}, {}
    for task in model.tasks:
        slots = export._slots(model.pair_encoding[task])
        names = [f"{s}_{k}" for s in slots for k in INPUT_KEYS]
        example = tuple(x[k] for x in export._example_inputs(tok, slots, export.SAMPLES[:2]) for k in INPUT_KEYS)
        batch = torch.export.Dim("batch", min=1, max=65536)
        seq = {s: torch.export.Dim(f"{s}_seq", min=1, max=512) for s in slots}
        shapes = tuple({0: batch, 1: seq[s]} for s in slots for _ in INPUT_KEYS)
        with export._quiet():
            torch.onnx.export(_WholeTaskGraph(model, task, len(slots)).eval(), example, str(out / f"{task}.onnx"),
                              dynamo=True, input_names=names, output_names=["logits", "pred", "prob"],
                              dynamic_shapes=(shapes,), external_data=False)
        files[task] = f"{task}.onnx"
        tasks[task] = {"slots": slots, "inputs": names, "outputs": ["logits", "pred", "prob"],
                       "labels": list(model.tasks[task].label_names or []), "kind": repr(model.tasks[task].kind)}
    tok.save(out)
    (out / "mtbert_onnx.json").write_text(json.dumps(
        {"format": 1, "max_length": 64, "pad_id": tok.pad_id, "tasks": tasks, "variants": {"fp32": files},
         "meta": meta}, default=float))
    return out


def test_an_export_in_the_old_per_task_layout_still_loads_and_predicts(run, dev, tmp_path, onnx_export):
    from mtbert.inference.onnx_predictor import OnnxPredictor
    from mtbert.inference.onnx_runner import OnnxModel

    old = _old_layout_export(run, tmp_path / "old")
    predictor = load_predictor(run, device="cpu", precision="fp32")
    runner = OnnxModel(old)
    assert sorted(runner.tasks) == ["qqp", "sst", "sts"]
    for task, examples in dev.items():
        got = runner.predict(task, _items(examples))
        assert np.abs(got["logits"] - predictor.predict(task, examples)["logits"]).max() < 1e-4, task
    assert evaluate_examples(OnnxPredictor(old), dev)[0] == pytest.approx(evaluate_examples(predictor, dev)[0], abs=1e-6)
    with pytest.raises(CheckpointError, match="no 'int8' graphs") as e:
        OnnxPredictor(old, "int8")
    assert len(str(e.value).splitlines()) == 1
    # today's runner.py, dropped into the old export, runs it too
    (old / "runner.py").write_bytes((onnx_export / "runner.py").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "runner.py", ".", "qqp", "How do I cook rice?", "How is rice cooked?"],
                       cwd=old, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["task"] == "qqp", r.stderr


def _rewrite_manifest(change):
    def breaks(out):
        path = out / "mtbert_onnx.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return breaks


@pytest.mark.parametrize("breaks,message", [
    (lambda out: (out / "mtbert_onnx.json").write_text('{"format": 2, "tasks": '), "mtbert_onnx.json is unreadable"),
    (lambda out: (out / "mtbert_onnx.json").unlink(), "is not an mtbert ONNX export"),
    (_rewrite_manifest(lambda m: m.update(format=3)), "layout format 3; this runner reads format 1 or 2"),
    (_rewrite_manifest(lambda m: m.pop("encoders")), "garbled: encoders do not map names to graph files"),
    (_rewrite_manifest(lambda m: m["tasks"]["sts"].update(encoder="elsewhere")), "garbled: task 'sts' names an encoder"),
    (_rewrite_manifest(lambda m: m["tasks"]["qqp"].pop("slots")), "garbled: task 'qqp' has no input slots"),
    (lambda out: (out / "heads" / "sts.onnx").unlink(), "graph file heads/sts.onnx is missing"),
    (lambda out: (out / "encoder.onnx").write_bytes(b"not a graph"), "onnxruntime cannot load encoder.onnx"),
], ids=["not JSON", "no manifest", "unknown format", "no encoders", "unknown encoder", "no slots", "no head file",
        "not a graph"])
def test_an_export_the_runner_cannot_read_is_a_one_line_error(onnx_export, tmp_path, breaks, message):
    import shutil

    from mtbert.inference.onnx_predictor import OnnxPredictor

    broken = tmp_path / "broken"
    shutil.copytree(onnx_export, broken)
    breaks(broken)
    with pytest.raises(CheckpointError) as e:
        OnnxPredictor(broken)
    assert message in str(e.value) and str(broken) in str(e.value) and len(str(e.value).splitlines()) == 1
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runner = broken / "runner.py" if (broken / "runner.py").exists() else onnx_export / "runner.py"
    r = subprocess.run([sys.executable, str(runner), str(broken), "sst", "A gripping film."], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {e.value}"]


def test_onnx_export_of_per_task_lora_experts(tmp_path, data_dir):
    """Per-task LoRA experts make each task's encoder its own: one encoder graph per task, each
    running its task's adapters."""
    def randomise_b(model):  # B starts at zero (adapters inert); make each task's experts differ
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)
    ckpt = _checkpoint(tmp_path, "data.tasks=[sst, cfimdb]", "techniques={lora_experts: {rank: 2}}", tweak=randomise_b)
    assert main(["export", str(ckpt), "--format", "sentence-transformers", "--out", str(tmp_path / "st")]) == 2
    assert not (tmp_path / "st").exists()
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    from mtbert.inference.onnx_runner import OnnxModel
    assert sorted(p.name for p in out.glob("*.onnx")) == ["encoder-cfimdb.onnx", "encoder-sst.onnx"]
    predictor = load_predictor(ckpt, device="cpu", precision="fp32")
    texts = ["A gripping film.", "Dull and far too long for what it has to say."]
    for task in ("sst", "cfimdb"):
        ref = predictor.predict(task, [Example(str(i), (t,), None) for i, t in enumerate(texts)])["logits"]
        assert np.abs(OnnxModel(out).predict(task, texts)["logits"] - ref).max() < 1e-4


def test_onnx_export_of_a_pair_head_that_reads_token_states(tmp_path):
    """The attention bi-encoder head reads token states and their mask, not pooled vectors: the
    encoder graph outputs them too, and the head graph takes them."""
    ckpt = _checkpoint(tmp_path, "data.tasks=[sst, qqp]", "model.bi_head=attention", "model.pair_encoding={qqp: bi}")
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    from mtbert.inference.onnx_runner import OnnxModel
    manifest = json.loads((out / "mtbert_onnx.json").read_text())
    assert manifest["encoder_outputs"] == ["vec", "tokens"] and manifest["tasks"]["qqp"]["reads"] == ["tokens", "attention_mask"]
    predictor = load_predictor(ckpt, device="cpu", precision="fp32")
    pairs = [("How do I cook rice?", "How is rice cooked?"), ("Is it going to rain?", "What is the capital of France?"),
             ("word " * 40, "Why?")]
    ref = predictor.predict("qqp", [Example(str(i), p, None) for i, p in enumerate(pairs)])["logits"]
    assert np.abs(OnnxModel(out, batch_size=2).predict("qqp", pairs)["logits"] - ref).max() < 1e-4


# ---------------------------------------------------------------- refusals

def test_existing_output_is_refused_unless_force(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads((out / EXPORT_MARKER).read_text())["format"] == "hf"
    (out / "stale.txt").write_text("from the earlier export")
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither the temporary nor the old copy left


@pytest.mark.parametrize("make", ["folder of the user's", "file", "link to a folder"])
def test_force_replaces_only_an_earlier_export(run, tmp_path, capsys, make):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    out = {"folder of the user's": mine, "file": tmp_path / "notes.txt", "link to a folder": tmp_path / "link"}[make]
    if make == "file":
        out.write_text("notes")
    elif make == "link to a folder":
        out.symlink_to(mine)
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"has no {EXPORT_MARKER}" in err and len(err.strip().splitlines()) == 1
    assert (mine / "thesis.tex").read_text() == "years of work" and (out.exists() or out.is_symlink())


def test_a_killed_writers_temporaries_are_removed_by_the_next(run, tmp_path):
    """After a SIGKILL nothing in-process can clean up; the next export of the same output removes
    the temporaries whose writer (the pid in their name) is gone, and no one else's."""
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999-x1"          # above any pid_max: no such process
    alive = tmp_path / f".out.tmp-{os.getppid()}-x2"   # a running process's: maybe still writing
    other = tmp_path / ".other.tmp-999999999-x3"       # another output's
    for d in (dead, alive, other):
        d.mkdir()
        (d / "model.safetensors").write_text("partial")
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert not dead.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize("args,message", [
    (["--format", "sentence-transformers"], "cls` or `mean` pooling"),
    (["--format", "onnx"], "bilstm"),
    (["--format", "hf", "--quantize", "int8"], "--format onnx only"),
])
def test_formats_refuse_what_they_cannot_hold(tmp_path, capsys, args, message):
    ckpt = _checkpoint(tmp_path, "model.pooling=cnn+bilstm", "data.tasks=[sst]")
    assert main(["export", str(ckpt), *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("fmt", ["hf", "sentence-transformers"])
def test_a_technique_declares_the_formats_that_hold_it(tmp_path, capsys, fmt):
    """Per-task LoRA experts (a different encoder per task) declare `exports = ("onnx",)`: the
    single-encoder formats refuse them with that declaration's reason."""
    ckpt = _checkpoint(tmp_path, "techniques={lora_experts: {rank: 2}}", "model.pooling=mean")
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "technique 'lora_experts' exports to --format onnx only" in err and "per task" in err


def test_ensembles_and_self_overwrites_are_refused(run, tmp_path, capsys):
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / ENSEMBLE_FILE).write_text("{}")
    assert main(["export", str(ens), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    assert "ensemble" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "hf", "--out", str(run), "--force"]) == 2
    assert "would replace the checkpoint" in capsys.readouterr().err
    assert (run / "best" / "model.safetensors").exists()


def test_a_kept_epochs_card_names_the_epoch_and_its_runs_command(tmp_path, synthetic_data_dir, monkeypatch):
    """An epoch checkpoint (train.keep_epochs) exports with its run's training command, under the
    run's name and epoch, and without the whole run's totals as if they were its own."""
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(synthetic_data_dir),
                 "--set", "train.max_steps=2", "--set", "train.keep_epochs=true",
                 "--set", "train.int8_check=false"]) == 0
    out = tmp_path / "hf"
    assert main(["export", str(run / "epochs" / "0"), "--format", "hf", "--out", str(out)]) == 0
    header, body = _card(out)
    assert header["model-index"][0]["name"] == "run-epoch0" and body.startswith("\n# run-epoch0")
    assert "kept at the end of epoch 0" in body and "Best checkpoint" not in body
    assert (run / "command.txt").read_text().strip() in body and "optimizer steps" not in body
    monkeypatch.chdir(run / "epochs")  # a relative path names the same run and epoch
    assert main(["export", "0", "--format", "hf", "--out", str(tmp_path / "hf2")]) == 0
    assert _card(tmp_path / "hf2")[0]["model-index"][0]["name"] == "run-epoch0"
