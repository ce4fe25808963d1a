
import pytest

from mmtrain.config import CONFIG_DIR, RunConfig, load_config


def test_defaults_are_the_tiny_recipe():
    assert load_config(CONFIG_DIR / "tiny.yaml") == RunConfig()


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
