import pytest
import yaml

from mtbert.apps.ablate import run_ablation
from mtbert.core.config import ConfigError, load_config
from tests.conftest import TINY_YAML


def _write(tmp_path, variants):
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({"config": str(TINY_YAML), "budget": "2 steps",
                                    "common": ["train.max_steps=2", "data.limit=16"], "variants": variants}))
    return path


def test_runs_variants_tabulates_and_skips_finished_ones(tmp_path, data_dir):
    path = _write(tmp_path, {"interleaved": [], "sequential": ["train.schedule=sequential"]})
    table = run_ablation(path, tmp_path / "runs", tmp_path / "results", [f"data.data_dir={data_dir}"])
    text = table.read_text()
    assert "| interleaved |" in text and "| sequential |" in text and "budget: 2 steps" in text
    done = tmp_path / "runs" / "mini" / "interleaved" / "summary.json"
    stamp = done.stat().st_mtime_ns
    # an interrupted variant (no summary.json) is run again; a finished one is not
    (tmp_path / "runs" / "mini" / "sequential" / "summary.json").unlink()
    run_ablation(path, tmp_path / "runs", tmp_path / "results", [f"data.data_dir={data_dir}"])
    assert done.stat().st_mtime_ns == stamp
    assert (tmp_path / "runs" / "mini" / "sequential" / "summary.json").exists()


def test_a_variant_the_hardware_cannot_run_natively_is_skipped_with_a_row(tmp_path, data_dir, machine):
    """configs/ablations/precision.yaml on an AVX2-only CPU: bf16 would be emulated, so it is not
    trained; the table says why."""
    machine(cpu_flags={"avx2", "fma"}, aten_isa="AVX2")
    path = _write(tmp_path, {"bf16": ["train.precision=bf16"], "fp32": ["train.precision=fp32"]})
    text = run_ablation(path, tmp_path / "runs", tmp_path / "results", [f"data.data_dir={data_dir}"]).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| bf16 |"))
    assert "skipped on this machine" in row and "neither AVX-512 BF16 nor AMX" in row
    assert not (tmp_path / "runs" / "mini" / "bf16").exists()
    assert (tmp_path / "runs" / "mini" / "fp32" / "summary.json").exists()


def test_bad_ablation_files(tmp_path):
    with pytest.raises(ConfigError, match="variants"):
        run_ablation(_write(tmp_path, {}), tmp_path / "r", tmp_path / "t")
    with pytest.raises(ConfigError, match="unknown config key"):
        run_ablation(_write(tmp_path, {"x": ["train.nope=1"]}), tmp_path / "r", tmp_path / "t")


@pytest.mark.parametrize("bad, expected", [
    (["techniques={smart: {norm: 3}}"], "smart.norm"),                 # a technique's option value
    (["techniques={smart: {colour: red}}"], "unknown options ['colour']"),
    (["train.weighting=no_such"], "unknown weighting 'no_such'"),
    (["data.data_dir=/no/such/dir"], "not found"),                     # the data, before any variant trains
])
def test_every_variant_is_validated_before_any_trains(tmp_path, data_dir, bad, expected):
    """Registry names, options and data of the last variant fail before the first one trains."""
    path = _write(tmp_path, {"first": [], "last": bad})
    with pytest.raises(ConfigError, match=r"variant last: .*" + expected.replace("[", r"\[").replace("]", r"\]")):
        run_ablation(path, tmp_path / "runs", tmp_path / "results", [f"data.data_dir={data_dir}"]
                     if "data_dir" not in bad[0] else [])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["pair_encoding", "schedules", "weightings", "techniques", "single_vs_multi",
                                  "precision"])
def test_shipped_ablation_variants_are_valid_configs(name):
    spec = yaml.safe_load(open(f"configs/ablations/{name}.yaml"))
    for overrides in spec["variants"].values():
        load_config(f"configs/ablations/{spec['config']}", [*spec["common"], *overrides])


def test_train_fraction_subsets_training_sets_only(tiny_cfg, data_dir, tmp_path):
    from mtbert.training.trainer import Trainer
    full = Trainer(tiny_cfg(f"data.data_dir={data_dir}"), tmp_path / "full")
    part = Trainer(tiny_cfg(f"data.data_dir={data_dir}", "data.train_fraction=0.25"), tmp_path / "part")
    for task in ("sst", "qqp", "sts"):
        assert len(part.train_sets[task]) == round(len(full.train_sets[task]) * 0.25)
        assert len(part.dev_sets[task]) == len(full.dev_sets[task])
    with pytest.raises(ConfigError, match="train_fraction"):
        tiny_cfg("data.train_fraction=0")
