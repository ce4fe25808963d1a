
import dataclasses

import pytest

from mmtrain.config import CONFIG_DIR, RunConfig, load_config


def test_defaults_are_the_tiny_recipe():
    """No --config is the embedded demo, configs/tiny.yaml: the only config that builds its data
    when missing (a typo in a user's data path must not train on a fake corpus)."""
    demo = load_config(None)
    assert demo == load_config(CONFIG_DIR / "tiny.yaml") and demo.data.synth_if_missing
    assert not RunConfig().data.synth_if_missing
    # The demo is the defaults, plus building its data and media tokenizers, and generating media.
    defaults = RunConfig()
    assert demo == RunConfig(
        model=dataclasses.replace(defaults.model, image_codes=1000, audio_codes=1000),
        data=dataclasses.replace(defaults.data, synth_if_missing=True,
                                 image_tokenizer="data/demo/tokenizers/image",
                                 audio_tokenizer="data/demo/tokenizers/audio"),
        train=dataclasses.replace(defaults.train, steps=280))
    for name in ("125m", "350m", "1b", "7b"):
        assert not load_config(CONFIG_DIR / f"{name}.yaml").data.synth_if_missing


@pytest.mark.parametrize("name", ["tiny", "125m", "350m", "1b", "7b"])
def test_every_recipe_loads(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.model.preset == name


def test_overrides_apply_and_parse_types():
    cfg = load_config(None, ["engine.lr=3e-4", "train.steps=7", "model.tie_embeddings=false"])
    assert cfg.engine.lr == 3e-4 and cfg.train.steps == 7 and cfg.model.tie_embeddings is False


@pytest.mark.parametrize("override, message", [
    ("model.n_kvheads=2", "unknown config key 'model.n_kvheads'"),
    ("model.n_heads=6", "model.n_heads=6 must divide model.dim=256"),
    ("model.n_kv_heads=3", "model.n_kv_heads=3 must divide model.n_heads=8"),
    ("train.steps=abc", "train.steps='abc' must be an integer"),
    ("engine.zero_stage=4", "engine.zero_stage=4 must be 0, 1, 2 or 3"),
    ("data.seq_len=4096", "data.seq_len=4096 exceeds model.max_seq_len=512"),
    ("trian.steps=3", "unknown config key 'trian'"),
    ("engine.offload_params=true", "engine.offload_params=True needs engine.zero_stage=3"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_yaml_python_tags_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    assert not marker.exists()


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_cli_dry_run_fails_fast_on_bad_config(capsys):
    from mmtrain.cli import main

    assert main(["train", "--dry-run", "--set", "model.dim=100"]) == 2
    assert "model.n_heads=8 must divide model.dim=100" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--set", "train.steps=5"]) == 0
    assert '"steps": 5' in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("engine.eps=nan", "engine.eps=nan must be a finite number"),
    ("engine.eps=.nan", "engine.eps=nan must be a finite number"),
    ("engine.lr=inf", "engine.lr=inf must be a finite number"),
    ("engine.weight_decay=-.inf", "engine.weight_decay=-inf must be a finite number"),
    ("train.spike_z=NaN", "train.spike_z=nan must be a finite number"),
    ("data.mix={a: 1, b: .inf}", "data.mix.b=inf must be a finite number"),
    ("engine.eps=-1e-8", "engine.eps=-1e-08 must be in (0, 1)"),
    ("engine.eps=0", "engine.eps=0.0 must be in (0, 1)"),
    ("engine.lr=-3e-4", "engine.lr=-0.0003 must be > 0"),
    ("engine.weight_decay=-0.1", "engine.weight_decay=-0.1 must be >= 0"),
    ("engine.grad_clip=-1", "engine.grad_clip=-1.0 must be >= 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0 must be in (0, 1)"),
    ("model.rope_theta=-10000", "model.rope_theta=-10000.0 must be > 0"),
])
def test_non_finite_and_out_of_range_numbers_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_non_finite_is_refused_when_built_in_code_too():
    from mmtrain.config import TrainConfig

    with pytest.raises(ValueError, match="train.ckpt_minutes=inf must be a finite number"):
        RunConfig(train=TrainConfig(ckpt_minutes=float("inf")))


def test_duplicate_yaml_keys_name_the_key_and_line(tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text("engine:\n  lr: 3.0e-4\n  zero_stage: 2\n  lr: 1.0e-3\ntrain:\n  steps: 5\n")
    with pytest.raises(ValueError, match=r"duplicate key 'lr' \(line 4; first set on line 2\)"):
        load_config(bad)
    (tmp_path / "top.yaml").write_text("train:\n  steps: 5\ntrain:\n  steps: 6\n")
    with pytest.raises(ValueError, match=r"duplicate key 'train' \(line 3; first set on line 1\)"):
        load_config(tmp_path / "top.yaml")
    with pytest.raises(ValueError, match=r"duplicate key 'a'"):
        load_config(None, ["data.mix={a: 1, a: 2}"])
    # A YAML merge key's values may still be overridden: that is not a duplicate.
    assert load_config(None, ["train={<<: {steps: 5, log_every: 1}, steps: 7}"]).train.steps == 7


def test_the_hang_dump_comes_before_the_collective_timeout():
    cfg = load_config(None, ["train.hang_dump_minutes=0.1", "engine.timeout_minutes=0.25"])
    assert cfg.train.hang_dump_minutes == 0.1 and cfg.engine.timeout_minutes == 0.25
    with pytest.raises(ValueError, match="train.hang_dump_minutes=10 must be below "
                                         "engine.timeout_minutes=10"):
        load_config(None, ["train.hang_dump_minutes=10"])
    with pytest.raises(ValueError, match="train.hang_dump_minutes=-1.0 must be >= 0"):
        load_config(None, ["train.hang_dump_minutes=-1"])
    assert load_config(None, ["train.hang_dump_minutes=0"]).train.hang_dump_minutes == 0
