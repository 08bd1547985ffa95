import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtbert.core.kinds import BINARY, BINNED_STS, CLASSIFICATION
from mtbert.core.tasks import get_task, overall_score
from mtbert.data.augment import AUGMENTATIONS, MASK, augment_texts, read_augment_file
from mtbert.data.readers import DataError, pad
from mtbert.inference.predictor import predict_dataset
from mtbert.modeling.checkpoint import load_checkpoint, save_checkpoint
from mtbert.training.techniques import build_techniques
from mtbert.training.techniques.uda import (
    confidence_mask,
    consistency_loss,
    sharpen,
    tsa_loss,
    tsa_threshold,
)
from mtbert.training.trainer import Trainer
from tests.conftest import step_context

# ---------------------------------------------------------------- TSA

@pytest.mark.parametrize("schedule, t, expected_alpha", [
    ("linear", 0, 0.0), ("linear", 50, 0.5), ("linear", 100, 1.0),
    ("log", 0, 0.0), ("log", 50, 1 - math.exp(-2.5)), ("log", 100, 1 - math.exp(-5)),
    ("exp", 0, math.exp(-5)), ("exp", 50, math.exp(-2.5)), ("exp", 100, 1.0),
])
def test_tsa_threshold_schedules(schedule, t, expected_alpha):
    for k in (2, 5, 26):
        assert tsa_threshold(schedule, t, 100, k) == pytest.approx(expected_alpha * (1 - 1 / k) + 1 / k)
    assert tsa_threshold(schedule, 150, 100, 5) == tsa_threshold(schedule, 100, 100, 5)  # clipped at T


def test_tsa_drops_exactly_the_confident_correct_examples():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.5, 0.4, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2])
    p_gold = logits.softmax(-1)[torch.arange(4), labels]  # .909, .352, .787, .333
    loss, keep = tsa_loss(logits, labels, CLASSIFICATION, 0.5)
    assert keep.tolist() == [False, True, False, True] == (p_gold <= 0.5).tolist()
    expected = -(p_gold[1].log() + p_gold[3].log()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()  # dropped examples get no gradient
    assert logits.grad[0].abs().sum() == 0 and logits.grad[2].abs().sum() == 0 and logits.grad[1].abs().sum() > 0
    # threshold 1 keeps everything: plain cross-entropy
    full, keep = tsa_loss(logits, labels, CLASSIFICATION, 1.0)
    assert keep.all() and full.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    # all dropped: zero loss, not NaN
    none, keep = tsa_loss(logits, labels, CLASSIFICATION, 0.0)
    assert not keep.any() and none.item() == 0.0


def test_tsa_binary_and_binned():
    z, y = torch.tensor([[2.0], [-1.0], [0.1]]), torch.tensor([1, 1, 0])
    p_gold = torch.tensor([torch.sigmoid(z[0, 0]), torch.sigmoid(z[1, 0]), 1 - torch.sigmoid(z[2, 0])])  # .88 .27 .475
    loss, keep = tsa_loss(z, y, BINARY, 0.6)
    assert keep.tolist() == [False, True, True]
    assert loss.item() == pytest.approx(-(p_gold[1].log() + p_gold[2].log()).item() / 2, rel=1e-5)
    logits = torch.zeros(2, 26)
    logits[0, 17] = 5.0   # confident on the gold bin of 3.4
    logits[1, 3] = 5.0    # confident on the wrong bin for 1.0 (bin 5)
    loss, keep = tsa_loss(logits, torch.tensor([3.4, 1.0]), BINNED_STS, 0.5)
    assert keep.tolist() == [False, True]
    assert loss.item() == pytest.approx(-logits[1].log_softmax(-1)[5].item(), rel=1e-6)


def test_tsa_in_the_technique_swaps_the_supervised_loss(tmp_path, tiny_cfg):
    tr = Trainer(tiny_cfg("techniques={uda: {weight: 0, tsa: exp}}", "data.tasks=[sst, qqp, sts_bins]"), tmp_path / "r")
    uda = tr.active_techniques["uda"]
    assert uda.tasks == ["sst", "qqp", "sts_bins"]
    batch = tr.next_batches(["sst"])["sst"]
    logits = torch.randn(len(batch["labels"]), 5) * 3
    ctx = step_context(tr, step=tr.total_steps // 2)
    eta = math.exp(5 * (ctx.step / ctx.total_steps - 1)) * 0.8 + 0.2
    p_gold = logits.softmax(-1)[torch.arange(len(logits)), batch["labels"]]
    kept = p_gold <= eta
    assert 0 < kept.sum() < len(kept), "pick a seed where TSA drops some but not all"
    got = uda.task_loss(ctx, "sst", batch, logits, F.cross_entropy(logits, batch["labels"]) + 7.0)
    expected = -p_gold[kept].log().mean() + 7.0  # what an earlier technique added (7.0) is kept
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert uda.last["sst"]["tsa_kept"] == pytest.approx(kept.float().mean().item())
    sts = tr.next_batches(["sts_bins"])["sts_bins"]
    assert sts["labels"].dtype == torch.float  # binned tasks keep their scores as labels


# ---------------------------------------------------------------- consistency term

def test_sharpening_is_softmax_with_temperature():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    assert torch.allclose(sharpen(logits, CLASSIFICATION, 0.4), (logits / 0.4).softmax(-1), atol=1e-6)
    assert torch.allclose(sharpen(logits, CLASSIFICATION, 1.0), logits.softmax(-1), atol=1e-6)
    z = torch.tensor([[0.7], [-2.0]])  # a binary logit z is the two-class logits [0, z]
    two = torch.cat([torch.zeros_like(z), z], -1)
    assert torch.allclose(sharpen(z, BINARY, 0.4), (two / 0.4).softmax(-1), atol=1e-6)


def test_confidence_mask_keeps_exactly_max_prob_above_beta():
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.2], [0.0, 0.0, 0.0]])
    pmax = logits.softmax(-1).max(-1).values  # .965 .576 .819 .333
    assert confidence_mask(logits, CLASSIFICATION, 0.8).tolist() == (pmax > 0.8).tolist() == [True, False, True, False]
    assert confidence_mask(torch.tensor([[3.0], [-3.0], [0.5]]), BINARY, 0.8).tolist() == [True, True, False]


def test_consistency_loss_matches_direct_kl_on_confident_examples():
    torch.manual_seed(0)
    clean = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    aug = torch.randn(3, 3, requires_grad=True)
    loss, keep = consistency_loss(clean, aug, CLASSIFICATION, tau=0.4, beta=0.8)
    assert keep.tolist() == [True, False, True]
    q, p = (clean.detach() / 0.4).softmax(-1), aug.detach().softmax(-1)
    kl = (q * (q / p).log()).sum(-1)
    assert loss.item() == pytest.approx(((kl[0] + kl[2]) / 2).item(), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert clean.grad is None  # the target is a constant
    assert aug.grad[1].abs().sum() == 0 and aug.grad[0].abs().sum() > 0
    same, _ = consistency_loss(clean, clean.detach() / 0.4, CLASSIFICATION, tau=0.4, beta=0.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)  # identical distributions: no penalty


def test_uda_term_in_trainer_equals_hand_computation(tmp_path, tiny_cfg):
    """With a file giving one augmentation per id, the added loss is exactly λ·KL to the model's
    output on the tokenised augmentations (dropout off so both passes are deterministic)."""
    tr = Trainer(tiny_cfg("data.tasks=[qqp]"), tmp_path / "r")
    exs = tr.train_sets["qqp"].examples
    path = tmp_path / "aug.tsv"
    path.write_text("id\tsentence1\tsentence2\n" + "".join(
        f"{e.id}\t{e.texts[1]}\t{e.texts[0]} indeed\n" for e in exs[::2]))  # half the ids only
    uda = build_techniques({"uda": {"weight": 2.0, "beta": 0.0, "tau": 0.5, "tsa": None,
                                    "augment": None, "augment_file": str(path)}})[0]
    ctx = step_context(tr)
    uda.setup(ctx)
    tr.model.eval()
    batch = tr.next_batches(["qqp"])["qqp"]
    # a random tiny model scores every input alike: spread the clean logits so rows must line up
    logits = tr.model("qqp", batch["inputs"]) + 2 * torch.randn(len(batch["indices"]), 1)
    got = uda.task_loss(ctx, "qqp", batch, logits, torch.tensor(1.0))
    idx = [j for j, i in enumerate(batch["indices"].tolist()) if i % 2 == 0]  # ids in the file
    assert 0 < len(idx) < len(batch["indices"])
    aug = [(exs[i].texts[1], exs[i].texts[0] + " indeed") for i in batch["indices"][idx].tolist()]
    enc = tr.tokenizer.encode_pairs([a for a, _ in aug], [b for _, b in aug])
    aug_z = tr.model("qqp", [pad(enc, tr.tokenizer.pad_id)]).view(-1)
    z = logits.detach().view(-1)[idx]
    q = (torch.stack([torch.zeros_like(z), z], -1) / 0.5).softmax(-1)
    lp = torch.stack([F.logsigmoid(-aug_z), F.logsigmoid(aug_z)], -1)
    kl = (q * (q.log() - lp)).sum(-1).mean()
    assert got.item() == pytest.approx(1.0 + 2.0 * kl.item(), rel=1e-4)
    assert uda.last["qqp"]["uda_kept"] == pytest.approx(len(idx) / len(batch["indices"]))


def test_uda_options_are_checked(tmp_path, tiny_cfg):
    with pytest.raises(ValueError, match="tsa"):
        build_techniques({"uda": {"tsa": "cosine"}})
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_techniques({"uda": {"augment": "backtranslate"}})
    with pytest.raises(ValueError, match="augment"):
        build_techniques({"uda": {"augment": None}})
    with pytest.raises(ValueError, match="sts_bins"):
        Trainer(tiny_cfg("techniques={uda: {tasks: [sts]}}"), tmp_path / "r")
    tr = Trainer(tiny_cfg("techniques={uda: {}}"), tmp_path / "r2")
    assert tr.active_techniques["uda"].tasks == ["sst", "qqp"]  # regression STS is left alone by default


# ---------------------------------------------------------------- augmentations

TEXT = "the quick brown fox jumps over the lazy dog near the river bank"


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentations_are_seeded_and_change_the_text(name):
    fn = AUGMENTATIONS[name]
    outs = [fn(TEXT, random.Random(seed)) for seed in range(5)]
    assert outs == [fn(TEXT, random.Random(seed)) for seed in range(5)]  # deterministic
    assert all(o != TEXT and o.strip() for o in outs)
    assert len(set(outs)) > 1  # and random
    assert fn("word", random.Random(0)).strip()  # never empties a text


def test_augmentations_do_what_they_say():
    rng, words = random.Random(3), TEXT.split()
    assert sorted(AUGMENTATIONS["swap"](TEXT, rng).split()) == sorted(words)
    dropped = AUGMENTATIONS["token_dropout"](TEXT, rng).split()
    assert len(dropped) < len(words)
    masked = AUGMENTATIONS["mask_span"](TEXT, rng).split()
    assert len(masked) == len(words) and masked.count(MASK) == 2  # round(0.15 * 13)
    assert len(AUGMENTATIONS["drop_span"](TEXT, rng).split()) == len(words) - 2
    pair = augment_texts(("a b c d e", "f g h i j"), ["swap"], random.Random(0))
    assert len(pair) == 2 and pair != ("a b c d e", "f g h i j")


def test_augment_file_reader_skips_and_counts_malformed_rows(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("id\ttext\n"
                   "x1\ta paraphrase\n"
                   "x1\tanother paraphrase\n"
                   "\tno id here\n"
                   "x2\t   \n"
                   "x3\n"
                   f"x4\t{'w' * 100_001}\n"
                   "x5\tfine\n")
    aug, report = read_augment_file(tsv)
    assert aug == {"x1": [("a paraphrase",), ("another paraphrase",)], "x5": [("fine",)]}
    assert (report.rows, report.skipped) == (7, 4)
    assert report.reasons == {"missing id": 1, "empty field": 1, "missing fields": 1, "text too long": 1}

    csv_ = tmp_path / "p.csv"
    csv_.write_text('id,sentence1,sentence2\np1,"one, two",three\np2,four\n')
    aug, report = read_augment_file(csv_)
    assert aug == {"p1": [("one, two", "three")]} and report.skipped == 1

    jl = tmp_path / "p.jsonl"
    jl.write_text('{"id": "p1", "sentence1": "a", "sentence2": "b"}\n{not json\n'
                  '{"id": "p2", "sentence1": "only one"}\n[1, 2]\n\n{"id": 7, "text": "numeric id"}\n')
    aug, report = read_augment_file(jl)
    assert aug == {"p1": [("a", "b")], "7": [("numeric id",)]}
    assert report.reasons == {"unparseable row": 1, "missing fields": 1, "row is not a JSON object": 1}

    bad = tmp_path / "b.tsv"
    bad.write_text("key\tparaphrase\nx\ty\n")
    with pytest.raises(DataError, match="header"):
        read_augment_file(bad)
    with pytest.raises(DataError, match="not found"):
        read_augment_file(tmp_path / "missing.tsv")


def test_ids_missing_from_the_file_fall_back_to_built_in_augmentation(tmp_path, tiny_cfg):
    tr = Trainer(tiny_cfg("data.tasks=[sst]"), tmp_path / "r")
    ex = tr.train_sets["sst"].examples
    path = tmp_path / "aug.jsonl"
    path.write_text(f'{{"id": "{ex[0].id}", "text": "from the file"}}\n'
                    f'{{"id": "{ex[1].id}", "sentence1": "a", "sentence2": "pair, wrong arity"}}\n')
    with_fallback = build_techniques({"uda": {"augment": "mask_span", "augment_file": str(path)}})[0]
    file_only = build_techniques({"uda": {"augment": None, "augment_file": str(path)}})[0]
    for u in (with_fallback, file_only):
        u.setup(step_context(tr))
        assert u.augmented("sst", ex[0]) == ("from the file",)
    assert MASK in with_fallback.augmented("sst", ex[1])[0]  # arity mismatch: not used
    assert file_only.augmented("sst", ex[1]) is None and file_only.augmented("sst", ex[2]) is None


# ---------------------------------------------------------------- STS as 26 bins

def test_binned_sts_round_trip():
    scores = torch.tensor([0.0, 0.2, 1.0, 3.4, 3.45, 4.95, 5.0])
    bins = BINNED_STS.to_bin(scores)
    assert bins.tolist() == [0, 1, 5, 17, 17, 25, 25]
    assert torch.allclose(BINNED_STS.bin_values()[bins], torch.tensor([0.0, 0.2, 1.0, 3.4, 3.4, 5.0, 5.0]))
    assert BINNED_STS.out_dim(26) == 26 and len(BINNED_STS.bin_values()) == 26
    one_hot = torch.full((3, 26), -50.0)
    one_hot[torch.arange(3), torch.tensor([0, 17, 25])] = 50.0
    assert torch.allclose(BINNED_STS.predict(one_hot), torch.tensor([0.0, 3.4, 5.0]), atol=1e-5)
    logits = torch.randn(4, 26)
    expected = (logits.softmax(-1) * (0.2 * torch.arange(26))).sum(-1)  # sum_k p_k * 0.2k
    assert torch.allclose(BINNED_STS.predict(logits), expected, atol=1e-5)
    assert BINNED_STS.loss(logits, scores[:4]).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 1, 5, 17])).item(), rel=1e-6)
    task = get_task("sts_bins")
    assert task.parse_label("3.8") == 3.8 and isinstance(task.kind, type(BINNED_STS)) and task.kind.bins == 26 and task.cs224n_output["prefix"] == "sts"
    assert overall_score({"sst": 0.5, "qqp": 0.8, "sts_bins": 0.6}) == pytest.approx((0.5 + 0.8 + 0.8) / 3)


def test_binned_sts_checkpoint_round_trip(tmp_path, tiny_cfg):
    tr = Trainer(tiny_cfg("data.tasks=[sst, qqp, sts_bins]", "train.max_steps=2"), tmp_path / "r")
    summary = tr.run()
    assert "overall" in summary["best_dev"] and "sts_bins" in summary["best_dev"]
    assert tr.model.heads["sts_bins"].proj.out_features == 26
    model, tok, cfg, _ = load_checkpoint(tmp_path / "r")
    assert model.heads["sts_bins"].proj.out_features == 26
    ds = tr.dev_sets["sts_bins"]
    a, b = predict_dataset(tr.model, ds)["pred"], predict_dataset(model, ds)["pred"]
    assert np.allclose(a, b, atol=1e-5) and a.dtype.kind == "f" and ((a >= 0) & (a <= 5)).all()
    save_checkpoint(tmp_path / "again", model, tok, cfg, {})  # and it saves again
    assert load_checkpoint(tmp_path / "again")[0].heads["sts_bins"].proj.out_features == 26


# ---------------------------------------------------------------- smoke runs

@pytest.mark.parametrize("overrides", [
    ["techniques={uda: {}}"],
    ["techniques={uda: {tsa: log, augment: drop_span}, smart: {weight: 1.0}}", "data.tasks=[sst, qqp, sts_bins]"],
])
def test_uda_smoke_runs(tmp_path, tiny_cfg, overrides):
    tr = Trainer(tiny_cfg(*overrides, "train.max_steps=3"), tmp_path / "r")
    summary = tr.run()
    assert summary["steps"] == 3 and "overall" in summary["best_dev"]
    uda = tr.active_techniques["uda"]
    assert set(uda.last) == set(uda.tasks)
