"""`mtbert report`: figures, numbers that match `mtbert evaluate`, the pure helpers, attention maps."""
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mtbert.apps import report as R
from mtbert.apps.cli import main
from mtbert.core.tasks import get_task
from mtbert.data.readers import pad
from mtbert.modeling.checkpoint import load_checkpoint
from tests.conftest import TINY_YAML

LIMIT = 40


def _train(out: Path, data_dir, *extra) -> Path:
    assert main(["train", "--config", str(TINY_YAML), "--out", str(out), "--data-dir", str(data_dir),
                 "--set", "train.eval_every=2", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data_dir):
    root = tmp_path_factory.mktemp("report-runs")
    a = _train(root / "run_a", synthetic_data_dir, "--set", "train.max_steps=4")
    b = _train(root / "run_b", synthetic_data_dir, "--set", "train.max_steps=2", "--set", "train.seed=7")
    return a, b


@pytest.fixture(scope="module")
def single(runs, synthetic_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-single")
    assert main(["report", str(runs[0]), "--out", str(out), "--data-dir", str(synthetic_data_dir), "--limit", str(LIMIT),
                 "--tsne-points", "30"]) == 0
    return out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def img_sources(index: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text())


def test_report_figures_exist_and_are_valid_pngs(single):
    import matplotlib.image as mpimg
    index = single / "index.html"
    assert index.exists()
    srcs = img_sources(index)
    # curves, sst + qqp confusion, sts scatter, t-SNE, attention
    assert len(srcs) == 6 and len(set(srcs)) == 6
    for name in ("curves", "sst-confusion", "qqp-confusion", "sts-scatter", "sst-tsne", "attention"):
        assert any(s.endswith(f"{name}.png") for s in srcs), name
    for src in srcs:
        path = single / src
        assert path.exists(), src
        w, h = png_size(path)
        assert 200 <= w <= 5000 and 200 <= h <= 5000, (src, w, h)
        assert mpimg.imread(path).std() > 0, f"{src} is blank"


def test_report_numbers_match_evaluate(single, runs, data_dir, tmp_path, capsys):
    ev = tmp_path / "eval.json"
    assert main(["evaluate", str(runs[0]), "--data-dir", str(data_dir), "--limit", str(LIMIT), "--json", str(ev)]) == 0
    expected = json.loads(ev.read_text())
    got = json.loads((single / "metrics.json").read_text())
    assert got["limit"] == LIMIT and len(got["runs"]) == 1
    run = got["runs"][0]
    assert set(run["metrics"]) == set(expected) == {"sst", "qqp", "sts", "overall"}
    page = (single / "index.html").read_text()
    for k, v in expected.items():
        assert run["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9)
        assert f"<td>{v:.4f}</td>" in page, k

    tasks = run["tasks"]
    sst, qqp, sts = tasks["sst"], tasks["qqp"], tasks["sts"]
    cm = np.array(sst["confusion"])
    assert cm.shape == (5, 5) and cm.sum() == LIMIT
    assert np.trace(cm) / LIMIT == pytest.approx(expected["sst"])
    q = np.array(qqp["confusion"])
    assert q.sum() == LIMIT and np.trace(q) / LIMIT == pytest.approx(expected["qqp"])
    tp, fp, fn = q[1, 1], q[0, 1], q[1, 0]
    assert qqp["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert qqp["recall"] == pytest.approx(tp / (tp + fn) if tp + fn else 0.0)
    for key in ("precision", "recall", "f1"):
        assert f"<td>{qqp[key]:.4f}</td>" in page
    assert np.array(sts["buckets"]).sum() == LIMIT and np.array(sts["buckets"]).shape == (6, 6)
    assert f"{sts['slope']:.4f}" in page and f"{sts['intercept']:.4f}" in page
    # error tables: top 10 per task, worst first, texts escaped into the page
    assert len(sts["errors"]) == 10
    errs = [e["error"] for e in sts["errors"]]
    assert errs == sorted(errs, reverse=True)
    for e in sst["errors"]:
        assert e["gold"] != e["pred"]
    if sst["errors"]:
        import html
        assert html.escape(sst["errors"][0]["texts"][0]) in page


def test_two_runs_comparison(runs, data_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out), "--data-dir", str(data_dir),
                 "--limit", "24", "--tsne-points", "20"]) == 0
    err = capsys.readouterr().err  # progress on stderr
    assert "report: predicting dev (sst, 24 examples)" in err and "report: running t-SNE" in err
    got = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in got["runs"]] == ["run_a", "run_b"]
    page = (out / "index.html").read_text()
    table = page.split('<table class="compare">')[1].split("</table>")[0]
    for r in got["runs"]:
        row = table.split(f"<td>{r['name']}</td>")[1].split("</tr>")[0]
        assert f"<td>{r['metrics']['overall']:.4f}</td>" in row
    srcs = img_sources(out / "index.html")
    assert len(srcs) == len(set(srcs)) == 2 * 6 + 1  # per-run figures + the overall comparison
    assert any(s.startswith("run1-run_a-") for s in srcs) and any(s.startswith("run2-run_b-") for s in srcs)
    assert all((out / s).exists() for s in srcs)


# ---------------------------------------------------------------- pure functions

def test_confusion_matrix_and_row_normalise():
    cm = R.confusion_matrix([0, 1, 2, 2, 1, 0], [0, 2, 2, 1, 1, 0], 4)
    assert cm.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    norm = R.row_normalise(cm)
    assert norm.tolist() == [[1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 0]]


def test_precision_recall_f1():
    m = R.precision_recall_f1([1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0])
    assert m["precision"] == 0.5 and m["recall"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.4)
    assert m["support"] == 3
    neg = R.precision_recall_f1([1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0], positive=0)
    assert neg["precision"] == 0.5 and neg["recall"] == pytest.approx(2 / 3)
    none = R.precision_recall_f1([1, 0], [0, 0])  # nothing predicted positive: 0, not a division error
    assert none == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_sts_bucket_table():
    gold = [0.2, 2.5, 4.6, 5.0, 1.4]
    pred = [0.6, 2.4, 5.3, -0.3, 1.5]
    assert R.to_buckets(gold).tolist() == [0, 3, 5, 5, 1]  # half up, clipped to 0..5
    assert R.to_buckets(pred).tolist() == [1, 2, 5, 0, 2]
    t = R.bucket_table(gold, pred)
    expected = np.zeros((6, 6), dtype=int)
    for g, p in [(0, 1), (3, 2), (5, 5), (5, 0), (1, 2)]:
        expected[g, p] += 1
    assert t.tolist() == expected.tolist()


def test_fit_line_equals_polyfit():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 5, 200)
    y = 0.7 * x + 0.4 + rng.normal(0, 0.3, 200)
    slope, intercept = R.fit_line(x, y)
    ps, pi = np.polyfit(x, y, 1)
    assert slope == pytest.approx(ps, abs=1e-10) and intercept == pytest.approx(pi, abs=1e-10)
    assert R.fit_line([2, 2, 2], [1, 2, 3]) == (0.0, 2.0)


def test_largest_errors_and_escaping():
    from mtbert.data.readers import Example
    sst = get_task("sst")
    ex = [Example(str(i), (f"s{i} <b>x</b> & y",), g) for i, g in enumerate([0, 1, 2, 3])]
    prob = np.array([[0.9, .1, 0, 0, 0], [0.8, .2, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0.4, 0.6, 0]])
    errs = R.largest_errors(sst, ex, {"pred": prob.argmax(1), "prob": prob})
    assert [e["id"] for e in errs] == ["1"]  # the only wrong one
    assert errs[0]["confidence"] == pytest.approx(0.8)
    qqp = get_task("qqp")
    qex = [Example(str(i), ("a", "b"), g) for i, g in enumerate([0, 1, 0, 1])]
    p = np.array([0.7, 0.05, 0.99, 0.6])
    errs = R.largest_errors(qqp, qex, {"pred": (p > 0.5).astype(int), "prob": p})
    assert [e["id"] for e in errs] == ["2", "1", "0"]
    assert [round(e["confidence"], 2) for e in errs] == [0.99, 0.95, 0.7]
    sts = get_task("sts")
    sex = [Example(str(i), ("a", "b"), g) for i, g in enumerate([1.0, 4.0, 2.0])]
    errs = R.largest_errors(sts, sex, {"pred": np.array([1.5, 1.0, 2.0]), "prob": None}, k=2)
    assert [e["id"] for e in errs] == ["1", "0"] and errs[0]["error"] == pytest.approx(3.0)
    page = R._errors_table(sst, R.largest_errors(sst, ex, {"pred": prob.argmax(1), "prob": prob}))
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in page and "<b>x</b>" not in page
    assert R.pick_layers(6) == [0, 3, 5] and R.pick_layers(2) == [0, 1] and R.pick_layers(1) == [0]


# ---------------------------------------------------------------- attention

def test_attention_maps_rows_sum_to_one_padding_zero_forward_unchanged(runs):
    model, tok, _, _ = load_checkpoint(runs[0])
    enc = tok.encode_pairs(["a short one", "a much longer first sentence about the weather today"],
                           ["yes", "and a second sentence that is also rather long"])
    inputs = pad(enc, tok.pad_id)
    n_short = len(enc[0][0])
    assert n_short < inputs["input_ids"].shape[1]  # the first row is padded
    with torch.no_grad():
        before = model("qqp", [inputs])
        plain = model.encoder(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    layers = R.pick_layers(model.encoder.config.num_hidden_layers)
    maps = R.attention_maps(model.encoder, inputs, layers, head=0)
    T = inputs["input_ids"].shape[1]
    for layer in layers:
        m = maps[layer]
        assert m.shape == (2, T, T)
        assert np.allclose(m.sum(-1), 1.0, atol=1e-5)
        assert np.all(m[0, :, n_short:] == 0.0)  # padded keys get exactly no weight
        assert np.all(m[1] > 0.0)
    # layer 0 equals an explicit softmax(QK^T / sqrt(d) + mask) of head 0
    with torch.no_grad():
        x = model.encoder.embeddings(inputs["input_ids"], inputs["token_type_ids"])
        att = model.encoder.layers[0].attention
        hd = x.shape[-1] // att.n_heads
        q, k, _ = att.qkv(x).view(2, T, 3, att.n_heads, hd).permute(2, 0, 3, 1, 4)
        scores = q[:, 0] @ k[:, 0].transpose(-1, -2) / math.sqrt(hd)
        scores = scores + torch.where(inputs["attention_mask"].bool(), 0.0, -math.inf)[:, None, :]
        assert np.allclose(maps[0], scores.softmax(-1).numpy(), atol=1e-5)
    with torch.no_grad():
        after = model("qqp", [inputs])
        slow = model.encoder(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                             output_attentions=True)
    assert torch.equal(before, after)  # extraction leaves the model as it was
    assert plain["attentions"] is None
    assert torch.allclose(plain["last_hidden_state"], slow["last_hidden_state"], atol=1e-5)
