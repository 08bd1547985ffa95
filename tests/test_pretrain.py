import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mtbert.apps.cli import main
from mtbert.core.config import ConfigError
from mtbert.core.runtime import set_seed
from mtbert.core.tasks import get_task
from mtbert.data.readers import load_split
from mtbert.modeling.checkpoint import build_model
from mtbert.modeling.model import MultitaskModel
from mtbert.training.pretrain import (
    MultipleNegativesRankingLoss,
    SimCSESupLoss,
    SimCSEUnsupLoss,
    info_nce,
    labeled_positives,
    labeled_sentences,
    run_pretrain,
    same_label_batches,
    unsup_sentences,
)
from mtbert.training.trainer import Trainer
from tests.conftest import TINY_YAML


@pytest.fixture
def one_thread():
    """Tiny tensors run faster on one thread than on cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- InfoNCE


def test_info_nce_matches_direct_computation():
    torch.manual_seed(0)
    a, p, tau = torch.randn(6, 10), torch.randn(6, 10), 0.07
    sim = torch.tensor([[F.cosine_similarity(a[i], p[j], dim=0).item() / tau for j in range(6)] for i in range(6)])
    expected = -sim.log_softmax(dim=1).diagonal().mean()
    assert info_nce(a, p, tau).item() == pytest.approx(expected.item(), rel=1e-5)
    # cosine, not dot product: rescaling a vector changes nothing
    assert info_nce(a * 7.0, p, tau).item() == pytest.approx(expected.item(), rel=1e-5)


def test_info_nce_is_minimal_for_aligned_positives_and_orthogonal_negatives():
    a = torch.eye(5, 8)                   # orthogonal anchors
    aligned = 3.0 * a                     # each positive points along its anchor
    best = info_nce(a, aligned, tau=0.05).item()
    assert best == pytest.approx(4 * torch.exp(torch.tensor(-20.0)).item(), abs=1e-7)  # log(1 + 4e^-20)
    assert best < 1e-6
    assert info_nce(a, aligned.roll(1, dims=0), tau=0.05).item() > 15   # wrong pairing: ~20
    torch.manual_seed(1)
    for _ in range(5):                    # any perturbation of the positives costs something
        assert info_nce(a, aligned + 0.3 * torch.randn_like(aligned), tau=0.05).item() > best


def test_info_nce_same_mask_drops_further_positives_from_the_denominator():
    torch.manual_seed(2)
    a, p, tau = torch.randn(4, 6), torch.randn(4, 6), 0.1
    labels = torch.tensor([0, 1, 0, 2])   # rows 0 and 2 share a label
    got = MultipleNegativesRankingLoss(scale=1 / tau)(lambda x: x, {"inputs": [a, p], "labels": labels})
    sim = F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T / tau
    rows = []
    for i in range(4):
        keep = [j for j in range(4) if j == i or labels[j] != labels[i]]
        rows.append(-(sim[i, i] - torch.logsumexp(sim[i, keep], 0)))
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)
    assert got.item() < info_nce(a, p, tau).item()   # fewer negatives, smaller loss
    # with distinct labels nothing is masked: plain InfoNCE with tau = 1 / scale
    distinct = torch.tensor([0, 1, 2, 3])
    assert MultipleNegativesRankingLoss(scale=1 / tau)(lambda x: x, {"inputs": [a, p], "labels": distinct}).item() \
        == pytest.approx(info_nce(a, p, tau).item(), rel=1e-6)


def test_simcse_losses_pair_the_right_views():
    torch.manual_seed(3)
    views = [torch.randn(5, 4), torch.randn(5, 4)]
    calls = []

    def embed(x):  # returns a different "dropout view" each call
        calls.append(x)
        return views[len(calls) - 1]

    assert SimCSEUnsupLoss(0.05)(embed, {"inputs": ["x"]}).item() == pytest.approx(info_nce(*views, 0.05).item())
    assert calls == ["x", "x"]            # the same sentences, encoded twice
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    sup = SimCSESupLoss(0.05)(lambda x: x, {"inputs": [a, b]})
    assert sup.item() == pytest.approx(info_nce(a, b, 0.05).item())


def test_unsup_views_differ_through_dropout(tiny_encoder, one_thread):
    model = MultitaskModel(tiny_encoder, [], {}, pooling="mean")
    x = {"input_ids": torch.randint(5, 1000, (4, 9)), "token_type_ids": torch.zeros(4, 9, dtype=torch.long),
         "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    model.eval()
    assert torch.equal(model.embed(x), model.embed(x))
    model.train()
    assert not torch.allclose(model.embed(x), model.embed(x))
    loss = SimCSEUnsupLoss(0.05)(model.embed, {"inputs": [x]})
    loss.backward()
    assert tiny_encoder.layers[0].ffn.up.weight.grad.abs().sum() > 0


def test_sup_loss_trains_the_encoder_towards_its_positives(tiny_encoder, one_thread):
    torch.manual_seed(4)
    model = MultitaskModel(tiny_encoder, [], {}, pooling="mean").eval()  # no dropout: a fixed objective
    make = lambda: {"input_ids": torch.randint(5, 1000, (8, 7)), "token_type_ids": torch.zeros(8, 7, dtype=torch.long),
                    "attention_mask": torch.ones(8, 7, dtype=torch.long)}
    batch = {"inputs": [make(), make()]}
    body = [p for n, p in model.named_parameters() if "word" not in n]  # skip the 30k-row table: speed
    loss_fn, opt = SimCSESupLoss(0.05), torch.optim.Adam(body, lr=3e-3)
    first = loss_fn(model.embed, batch).item()
    for _ in range(15):
        opt.zero_grad()
        loss_fn(model.embed, batch).backward()
        opt.step()
    assert loss_fn(model.embed, batch).item() < 0.5 * first


# ---------------------------------------------------------------- data


def _write(path, header, rows):
    path.write_text(header + "\n" + "".join(f"{i}\t" + "\t".join(r) + "\n" for i, r in enumerate(rows)))


@pytest.fixture
def fixture_examples(tmp_path):
    _write(tmp_path / "quora-train.csv", "\tid\tsentence1\tsentence2\tis_duplicate", [
        ("q1", "How do I cook rice?", "What is the best way to cook rice?", "1.0"),
        ("q2", "Is Paris big?", "Is Rome old?", "0.0"),
        ("q3", "Why is the sky blue?", "What makes the sky blue?", "1"),
        ("q4", "Who are you?", "Where are you?", "0"),
    ])
    _write(tmp_path / "sts-train.csv", "\tid\tsentence1\tsentence2\tsimilarity", [
        ("s1", "A man plays a guitar.", "A man is playing the guitar.", "4.8"),
        ("s2", "A cat sleeps.", "A dog barks.", "0.4"),
        ("s3", "Kids run outside.", "Children are running outdoors.", "4.0"),   # exactly the threshold
        ("s4", "She reads a book.", "She is reading.", "3.99"),
        ("s5", "Stocks fell.", "Markets dropped.", "5.0"),
    ])
    _write(tmp_path / "ids-sst-train.csv", "\tid\tsentence\tsentiment", [
        ("t1", "Great fun .", "4"), ("t2", "Awful .", "0"), ("t3", "A triumph .", "4"),
        ("t4", "Dull and flat .", "0"), ("t5", "It is a film .", "2"),
    ])
    return {t: load_split(get_task(t), tmp_path, "train")[0] for t in ("sst", "qqp", "sts")}


def test_supervised_positives_are_qqp_duplicates_and_sts_pairs_at_or_above_threshold(fixture_examples):
    pairs = labeled_positives(fixture_examples, sts_threshold=4.0)
    assert sorted(pairs) == sorted([
        ("How do I cook rice?", "What is the best way to cook rice?"),
        ("Why is the sky blue?", "What makes the sky blue?"),
        ("A man plays a guitar.", "A man is playing the guitar."),
        ("Kids run outside.", "Children are running outdoors."),
        ("Stocks fell.", "Markets dropped."),
    ])
    stricter = labeled_positives(fixture_examples, sts_threshold=4.5)
    assert ("Kids run outside.", "Children are running outdoors.") not in stricter and len(stricter) == 4
    assert labeled_positives({"sst": fixture_examples["sst"]}, 4.0) == []  # single sentences give no pairs


def test_unsup_sentences_are_distinct_and_cover_both_sides(fixture_examples):
    fixture_examples["sst"].append(fixture_examples["sst"][0])  # a repeated sentence appears once
    texts = unsup_sentences(fixture_examples)
    assert len(texts) == len(set(texts)) == 5 + 2 * 4 + 2 * 5
    assert "Markets dropped." in texts and "Great fun ." in texts


def test_mnrl_pairs_share_a_label_and_batches_hold_one_pair_per_class():
    rng = random.Random(0)
    labels = [rng.choice([0, 0, 0, 1, 1, 2, 3, 4]) for _ in range(200)] + [5]  # imbalanced; class 5 has one
    counts = {y: labels.count(y) for y in set(labels)}
    for seed in range(5):
        batches = same_label_batches(labels, random.Random(seed))
        assert len(batches) == min(c // 2 for y, c in counts.items() if c >= 2)
        seen = set()
        for batch in batches:
            assert all(labels[i] == labels[j] for i, j in batch)            # positives share the label
            assert len({labels[i] for i, _ in batch}) == len(batch) == 5      # no two anchors of a class
            used = [k for pair in batch for k in pair]
            assert not seen & set(used) and len(set(used)) == len(used)      # each sentence once per pass
            seen |= set(used)
    with pytest.raises(ValueError, match="two classes"):
        same_label_batches([0, 0, 1], random.Random(0))


def test_mnrl_reads_single_sentence_classification_tasks_only(fixture_examples):
    texts, classes = labeled_sentences(fixture_examples)
    assert texts == ["Great fun .", "Awful .", "A triumph .", "Dull and flat .", "It is a film ."]
    assert classes[0] == classes[2] and classes[1] == classes[3] and len(set(classes)) == 3
    batches = same_label_batches(classes, random.Random(0))
    assert len(batches) == 1 and sorted(tuple(sorted(p)) for p in batches[0]) == [(0, 2), (1, 3)]


# ---------------------------------------------------------------- the stage and the CLI


def test_pretrain_config_section(tiny_cfg):
    cfg = tiny_cfg("pretrain.tau=0.1", "pretrain.objectives=[mnrl]")
    assert cfg.pretrain.tau == 0.1 and cfg.pretrain.objectives == ["mnrl"] and not cfg.pretrain.enabled
    assert cfg.pretrain.sts_threshold == 4.0 and cfg.pretrain.pooling == "mean"
    with pytest.raises(ConfigError, match="unknown config key"):
        tiny_cfg("pretrain.temperature=0.1")


def test_unknown_objective_and_missing_data_are_clear_errors(tmp_path, tiny_cfg):
    with pytest.raises(ValueError, match="must name some of"):
        run_pretrain(tiny_cfg("pretrain.objectives=[simclr]"), tmp_path / "a")
    with pytest.raises(ValueError, match="single-sentence classification"):
        run_pretrain(tiny_cfg("pretrain.objectives=[mnrl]", "data.tasks=[qqp]"), tmp_path / "b")


def test_pretrain_cli_checkpoint_is_a_starting_point_for_train(tmp_path, data_dir, tiny_cfg, capsys):
    pt, ft = tmp_path / "pt", tmp_path / "ft"
    args = ["--data-dir", str(data_dir), "--set", "train.threads=1"]
    assert main(["pretrain", "--config", str(TINY_YAML), "--out", str(pt), "--set", "pretrain.max_steps=3",
                 "--set", "pretrain.lr=1e-3", *args]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    assert (pt / "best" / "model.safetensors").exists() and (pt / "best" / "model.json").exists()
    pretrained = load_file(str(pt / "best" / "model.safetensors"))
    assert not any(k.startswith("heads.") for k in pretrained)
    # the stage trained the encoder: it left the seeded random initialisation
    cfg = tiny_cfg(f"data.data_dir={data_dir}")
    set_seed(cfg.train.seed)
    init = build_model(cfg)[0].encoder.state_dict()
    key = "encoder.layers.0.attention.qkv.weight"
    assert not torch.allclose(pretrained[key], init[key.removeprefix("encoder.")])

    start = [f"model.backbone={pt}", "model.tiny=null", f"data.data_dir={data_dir}", "train.threads=1"]
    tr = Trainer(tiny_cfg(*start), tmp_path / "check")   # fine-tuning starts from the pretrained encoder
    for k, v in tr.model.encoder.state_dict().items():
        assert torch.equal(v.cpu(), pretrained["encoder." + k]), k
    assert main(["train", "--config", str(TINY_YAML), "--out", str(ft), "--set", f"model.backbone={pt}",
                 "--set", "model.tiny=null", "--set", "train.max_steps=2", *args]) == 0
    assert (ft / "best" / "model.safetensors").exists()


def test_train_with_pretrain_enabled_runs_the_stage_first(tmp_path, data_dir, tiny_cfg):
    cfg = tiny_cfg("pretrain.enabled=true", "pretrain.max_steps=2", "pretrain.objectives=[simcse_sup, mnrl]",
                   "train.max_steps=1", "train.threads=1", f"data.data_dir={data_dir}")
    tr = Trainer(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "pretrain" / "best"
    pretrained = load_file(str(ckpt / "model.safetensors"))
    for k, v in tr.model.encoder.state_dict().items():
        assert torch.equal(v.cpu(), pretrained["encoder." + k]), k
    assert set(tr.model.heads) == {"sst", "qqp", "sts"}
    assert tr.run()["steps"] == 1
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 2 and meta["objectives"] == ["simcse_sup", "mnrl"]


def test_techniques_lists_the_pretraining_stages(capsys):
    assert main(["techniques"]) == 0
    out = capsys.readouterr().out
    for name in ("simcse_unsup", "simcse_sup", "mnrl"):
        assert name in out
    assert "mtbert pretrain" in out
