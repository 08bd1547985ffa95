"""Knowledge distillation (technique `distill`): the loss formula per output kind, alpha = 0 is
plain training, a student pulled by a fixed teacher's targets moves toward it, targets are cached
by teacher and data, mismatched teachers are refused before training, resume and ensembles."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mtbert.core.kinds import BINARY, BINNED_STS, CLASSIFICATION, REGRESSION
from mtbert.core.runtime import auto_precision
from mtbert.inference.ensemble import build_ensemble
from mtbert.inference.loading import load_predictor
from mtbert.training.techniques.base import StepContext
from mtbert.training.techniques.distill import Distill
from mtbert.training.trainer import Trainer
from tests.conftest import TINY_YAML

STEPS = ["train.max_steps=6", "train.threads=1", "data.limit=24"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, synthetic_data_dir):
    """A tiny run trained hard (lr 3e-3, 16 steps, another seed) so that its outputs are its own."""
    from mtbert.core.config import load_config
    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(TINY_YAML, ["train.max_steps=16", "train.lr=3e-3", "train.seed=7", "data.limit=24",
                                  "train.threads=1", f"data.data_dir={synthetic_data_dir}"])
    Trainer(cfg, out).run()
    return out


def _distill(teacher, **opts) -> str:
    inner = ", ".join(f"{k}: {v}" for k, v in {"teacher": str(teacher), **opts}.items())
    return f"techniques={{distill: {{{inner}}}}}"


# ---------------------------------------------------------------- the formula

class _Task:
    def __init__(self, kind):
        self.kind = kind


class _Model:
    def __init__(self, kinds):
        self.tasks = {t: _Task(k) for t, k in kinds.items()}


@pytest.mark.parametrize("kind,K", [(CLASSIFICATION, 5), (BINARY, 1), (REGRESSION, 1), (BINNED_STS, 26)],
                         ids=["classification", "binary", "regression", "binned"])
@pytest.mark.parametrize("alpha,T", [(0.3, 2.0), (1.0, 1.0)])
def test_loss_is_the_weighted_sum_of_hard_and_soft(kind, K, alpha, T):
    torch.manual_seed(0)
    B = 6
    student = torch.randn(B, K, requires_grad=True)
    teacher_out = torch.randn(B, K) * 2
    if kind is REGRESSION:
        labels = torch.rand(B) * 5
        hard = F.mse_loss(student.view(-1), labels)
        soft = F.mse_loss(student.view(-1), teacher_out.view(-1))
    elif kind is BINNED_STS:
        labels = torch.rand(B) * 5
        hard = F.cross_entropy(student, (labels / 0.2).round().long())
        soft = T * T * F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher_out / T, -1), reduction="batchmean")
    elif kind is BINARY:
        labels = torch.randint(0, 2, (B,))
        hard = F.binary_cross_entropy_with_logits(student.view(-1), labels.float())
        pt, ps = torch.sigmoid(teacher_out.view(-1) / T), torch.sigmoid(student.view(-1) / T)
        kl = pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()
        soft = T * T * kl.mean()
    else:
        labels = torch.randint(0, K, (B,))
        hard = F.cross_entropy(student, labels)
        soft = T * T * F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher_out / T, -1), reduction="batchmean")
    tech = Distill(teacher="unused", alpha=alpha, temperature=T)
    tech.targets = {"t": kind.soft_target(teacher_out)}
    ctx = StepContext(_Model({"t": kind}), total_steps=1)
    batch = {"indices": torch.arange(B), "labels": labels}
    other = torch.tensor(0.7)  # what an earlier technique added: kept as it is
    got = tech.task_loss(ctx, "t", batch, student, kind.loss(student, labels) + other)
    assert got.item() == pytest.approx(((1 - alpha) * hard + alpha * soft + other).item(), rel=1e-5)
    # a student equal to the teacher pays no soft loss, and its soft gradient is zero
    assert kind.distillation_loss(teacher_out, kind.soft_target(teacher_out), T).item() == pytest.approx(0, abs=1e-6)


def test_options_are_checked():
    with pytest.raises(ValueError, match="teacher is required"):
        Distill()
    with pytest.raises(ValueError, match="alpha must be in"):
        Distill(teacher="x", alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Distill(teacher="x", temperature=0)


# ---------------------------------------------------------------- training with a teacher

def _weights(run):
    return load_file(str(run / "best" / "model.safetensors"))


def test_alpha_zero_equals_plain_training(tmp_path, tiny_cfg, teacher, data_dir):
    plain = Trainer(tiny_cfg(*STEPS, f"data.data_dir={data_dir}"), tmp_path / "plain")
    a = plain.run()
    zero = Trainer(tiny_cfg(*STEPS, f"data.data_dir={data_dir}", _distill(teacher, alpha=0.0, temperature=2.0)),
                   tmp_path / "zero")
    b = zero.run()
    assert a["best_dev"] == b["best_dev"]
    wa, wb = _weights(tmp_path / "plain"), _weights(tmp_path / "zero")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(list((tmp_path / "zero" / "teacher_targets").glob("*.safetensors"))) == 1  # the path did run


def _distance_to_teacher(run, teacher, train_sets) -> float:
    """Sum over tasks of the mean soft loss (T = 1) of the run's outputs against the teacher's."""
    student, ref = load_predictor(run, device="cpu"), load_predictor(teacher, device="cpu")
    total = 0.0
    for t, ds in train_sets.items():
        kind = ds.task.kind
        s = torch.as_tensor(student.predict(t, ds.examples)["logits"])
        r = kind.soft_target(torch.as_tensor(ref.predict(t, ds.examples)["logits"]))
        total += float(kind.distillation_loss(s, r, 1.0))
    return total


def test_student_moves_toward_the_teacher(tmp_path, tiny_cfg, teacher, data_dir):
    """Trained on the teacher's targets alone (alpha = 1), the student ends closer to the teacher
    than the same student trained on the gold labels."""
    sets = [*STEPS, "train.max_steps=12", "train.lr=3e-3", f"data.data_dir={data_dir}"]
    plain = Trainer(tiny_cfg(*sets), tmp_path / "plain")
    plain.run()
    distilled = Trainer(tiny_cfg(*sets, _distill(teacher, alpha=1.0)), tmp_path / "kd")
    distilled.run()
    d_plain = _distance_to_teacher(tmp_path / "plain", teacher, plain.train_sets)
    d_kd = _distance_to_teacher(tmp_path / "kd", teacher, distilled.train_sets)
    assert d_kd < 0.7 * d_plain, (d_kd, d_plain)


def test_targets_are_cached_by_teacher_and_data(tmp_path, tiny_cfg, teacher, data_dir, monkeypatch):
    cache = tmp_path / "shared_cache"
    base = [*STEPS, "train.max_steps=1", f"data.data_dir={data_dir}"]
    first = Trainer(tiny_cfg(*base, _distill(teacher, cache_dir=cache)), tmp_path / "a")
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    targets = load_file(str(files[0]))
    assert targets["sst"].shape == (24, 5) and targets["qqp"].shape == (24, 2) and targets["sts"].shape == (24,)
    assert torch.allclose(targets["sst"].exp().sum(-1), torch.ones(24), atol=1e-5)  # log-probabilities
    # the teacher's own predictions, stored as they are (distill.precision auto = training's rule:
    # bf16 where the CPU computes it natively, else fp32)
    sst = first.train_sets["sst"]
    precision = auto_precision(torch.device("cpu"))[0]
    ref = load_predictor(teacher, device="cpu", precision=precision).predict("sst", sst.examples)
    assert torch.allclose(targets["sst"].exp(), torch.as_tensor(ref["prob"]), atol=1e-5)

    # same teacher and data: read from the cache, no teacher is loaded
    import mtbert.training.techniques.distill as distill_mod
    monkeypatch.setattr(distill_mod, "load_predictor", lambda *a, **k: pytest.fail("teacher loaded again"))
    Trainer(tiny_cfg(*base, _distill(teacher, cache_dir=cache)), tmp_path / "b")
    # other data (a larger limit): another key
    monkeypatch.undo()
    Trainer(tiny_cfg(*base, "data.limit=30", _distill(teacher, cache_dir=cache)), tmp_path / "c")
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_teacher_with_other_tasks_is_refused_before_training(tmp_path, tiny_cfg, data_dir):
    only_sst = tmp_path / "sst_teacher"
    Trainer(tiny_cfg("data.tasks=[sst]", "train.max_steps=1", "data.limit=8", f"data.data_dir={data_dir}"),
            only_sst).run()
    with pytest.raises(ValueError, match=r"teacher .* has tasks \['sst'\], but the student trains \['qqp', 'sts'\]"):
        Trainer(tiny_cfg(*STEPS, f"data.data_dir={data_dir}", _distill(only_sst)), tmp_path / "student")
    assert not (tmp_path / "student" / "metrics.jsonl").exists()
    # distilling only the task the teacher has is fine
    Trainer(tiny_cfg(*STEPS, f"data.data_dir={data_dir}", _distill(only_sst, tasks="[sst]")), tmp_path / "ok")


def test_ensemble_teacher_and_resume(tmp_path, tiny_cfg, teacher, data_dir, monkeypatch):
    """An ensemble directory teaches (its averaged distribution); a resumed distilled run ends as
    the uninterrupted one does."""
    other = tmp_path / "teacher2"
    Trainer(tiny_cfg("train.max_steps=4", "train.seed=3", "data.limit=24", f"data.data_dir={data_dir}"), other).run()
    ens = tmp_path / "ens"
    build_ensemble([teacher, other], ens, data_dir=data_dir, device="cpu", limit=16)
    sets = [*STEPS, "train.max_steps=8", "train.epochs=2", "train.eval_every=4", "train.save_every=3",
            "train.schedule=annealed", f"data.data_dir={data_dir}", _distill(ens, alpha=0.7, temperature=2.0)]
    full = Trainer(tiny_cfg(*sets), tmp_path / "full").run()
    from tests.test_resume import Crash, _crash_after
    _crash_after(monkeypatch, 5)
    with pytest.raises(Crash):
        Trainer(tiny_cfg(*sets), tmp_path / "run").run()
    monkeypatch.undo()
    resumed = Trainer(tiny_cfg(*sets), tmp_path / "run", resume=True).run()
    assert resumed["best_dev"] == full["best_dev"] and resumed["steps"] == full["steps"]


def test_two_processes_match_one(tmp_path, tiny_cfg, teacher, data_dir):
    """Under torchrun the main rank labels the data once; every rank reads the cache."""
    from tests.test_distributed import SETS
    sets = SETS + [_distill(teacher, alpha=0.5)]
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mtbert.cli", "train", "--config", str(TINY_YAML), "--out", str(ddp), "--data-dir", str(data_dir),
           *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    single = Trainer(tiny_cfg(*sets, f"data.data_dir={data_dir}"), tmp_path / "single")
    single.run()
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ddp, tmp_path / "single")]
    for ra, rb in zip(*rows):
        assert ra["dev"] == pytest.approx(rb["dev"], abs=1e-3)
    wa, wb = _weights(ddp), _weights(tmp_path / "single")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wb)
    Trainer(tiny_cfg(*SETS, f"data.data_dir={data_dir}"), tmp_path / "plain").run()  # distillation did act
    wp = _weights(tmp_path / "plain")
    assert not all(torch.allclose(wp[k], wb[k], atol=1e-4) for k in wb)
