"""The one Registry type: registering, option checking, unknown names, and entries users add from
outside the package (an import path in the config, a `plugins:` module, an entry point)."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from mtbert.core.config import ConfigError, load_config
from mtbert.core.registry import Registry
from mtbert.training.schedules import SCHEDULES
from mtbert.training.techniques import TECHNIQUES, GradientCombiner, build_techniques
from mtbert.training.trainer import Trainer
from mtbert.training.weightings import WEIGHTINGS


def test_register_get_build_and_errors():
    reg = Registry("widget")

    @reg.register(name="box")
    class Box:
        def __init__(self, size: int = 1):
            self.size = size

    assert reg.get("box") is Box and Box.name == "box" and "box" in reg
    assert reg.build("box", size=3).size == 3
    with pytest.raises(ValueError, match=r"widget 'box' got unknown options \['colour'\]; it takes \['size'\]"):
        reg.build("box", colour="red")
    with pytest.raises(ValueError, match=r"unknown widget 'crate'; choose from \['box'\]"):
        reg.get("crate")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(type("Other", (), {}), name="box")


def test_build_leaves_positional_arguments_to_mtbert():
    # weightings get the task list from mtbert; the user's options are checked after it
    with pytest.raises(ValueError, match=r"unknown options \['tasks'\]"):
        WEIGHTINGS.build("sum", [], tasks=[])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's, outside the package, importable as `my_mtbert_ext`."""
    (tmp_path / "my_mtbert_ext.py").write_text(textwrap.dedent('''
        import torch
        from mtbert.training.schedules import SCHEDULES
        from mtbert.training.weightings import Weighting

        class Doubled(Weighting):
            """every task loss counts twice"""
            def forward(self, losses):
                return sum(2.0 * l for l in losses.values())

        @SCHEDULES.register(name="only_first")
        class OnlyFirst:
            def plan(self, batches, epoch, num_epochs, rng):
                first = next(iter(batches))
                return [[first] for _ in range(batches[first])]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_mtbert_ext"
    sys.modules.pop("my_mtbert_ext", None)
    SCHEDULES._entries.pop("only_first", None)


def test_import_path_in_the_config_names_a_users_class(tmp_path, tiny_cfg, user_module):
    tr = Trainer(tiny_cfg(f"train.weighting={user_module}:Doubled", "train.max_steps=1"), tmp_path / "r")
    loss = torch.tensor(1.5)
    assert tr.weighted_loss({"sst": loss}).item() == pytest.approx(3.0)


def test_plugins_module_registers_entries_by_name(tmp_path, tiny_cfg, user_module):
    with pytest.raises(ValueError, match="unknown schedule 'only_first'"):
        Trainer(tiny_cfg("train.schedule=only_first"), tmp_path / "a")
    tr = Trainer(tiny_cfg(f"plugins=[{user_module}]", "train.schedule=only_first"), tmp_path / "b")
    assert {t for step in tr.plans[0] for t in step} == {"sst"}


def test_unimportable_plugin_is_a_config_error():
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_module_xyz'"):
        load_config(None, ["plugins=[no_such_module_xyz]"])


def test_entry_point_plugins_are_found(tmp_path, monkeypatch, user_module):
    dist = tmp_path / "my_mtbert_ext-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-mtbert-ext\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[mtbert.weightings]\ndoubled = {user_module}:Doubled\n")
    monkeypatch.setattr(WEIGHTINGS, "_plugins_loaded", False)
    monkeypatch.setattr(WEIGHTINGS, "_entries", dict(WEIGHTINGS._entries))
    assert WEIGHTINGS.get("doubled").__name__ == "Doubled"


def test_two_gradient_combiners_are_an_error(monkeypatch):
    monkeypatch.setattr(TECHNIQUES, "_entries", dict(TECHNIQUES._entries))

    @TECHNIQUES.register
    class Averaged(GradientCombiner):
        name = "averaged"

        def combine(self, grads):
            return torch.stack(grads).mean(0)

    assert [t.name for t in build_techniques({"averaged": {}})] == ["averaged"]
    with pytest.raises(ValueError, match=r"\['pcgrad', 'averaged'\] all combine per-task gradients"):
        build_techniques({"pcgrad": {}, "averaged": {}})


def test_an_import_path_to_a_kwargs_callable_is_refused_even_from_the_users_config(tiny_cfg, tmp_path):
    """`train.schedule: subprocess:run` would run whatever its options say; a **kwargs target cannot
    have its options checked, so an import path to one is refused (registered entries may take **kwargs)."""
    marker = tmp_path / "ran"
    cfg = tiny_cfg("train.schedule=subprocess:run", f"train.schedule_args={{args: [touch, {marker}]}}")
    with pytest.raises(ConfigError, match=r"schedule 'subprocess:run' takes \*\*kwargs"):
        SCHEDULES.build(cfg.train.schedule, **cfg.train.schedule_args)
    assert not marker.exists()

    reg = Registry("widget")
    reg.register(lambda **options: options, name="open")
    assert reg.build("open", a=1) == {"a": 1}
