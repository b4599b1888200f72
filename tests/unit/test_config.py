import pytest

from star_scale.config import Config, ConfigError, load_config, save_config


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model_dims() == (2, 4, 64)
    assert cfg.contrastive_layer() == 1


def test_width_not_divisible_by_heads_names_both_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.width=100", "model.heads=12"])
    msg = str(e.value)
    assert "model.width=100" in msg and "model.heads=12" in msg


def test_unknown_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  widht: 64\n")
    with pytest.raises(ConfigError, match=r"model\.widht: unknown key"):
        load_config(recipe)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.steps='many': expected int"):
        load_config(None, ["train.steps=many"])


def test_negative_step_start_timeout_is_refused():
    with pytest.raises(ConfigError, match=r"cluster\.step_start_timeout=-5: expected a number >= 0"):
        load_config(None, ["cluster.step_start_timeout=-5"])


def test_tp_must_divide_heads():
    with pytest.raises(ConfigError, match=r"parallel\.tp=3: expected a divisor of model\.heads=4"):
        load_config(None, ["parallel.tp=3"], world_size=3)


def test_batch_must_divide_over_data_parallel_ranks():
    with pytest.raises(ConfigError, match=r"data\.global_batch=10: expected a positive multiple of the data-parallel size 4"):
        load_config(None, ["data.global_batch=10"], world_size=4)


def test_objective_shorthand_and_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("objective: star\noptimizer:\n  lr: 3e-4\n")
    cfg = load_config(recipe, ["objective.mask_ratio=0.5"])
    assert cfg.objective.name == "star" and cfg.objective.mask_ratio == 0.5
    assert cfg.optimizer.lr == 3e-4 and cfg.name == "r"


def test_bad_objective_value():
    with pytest.raises(ConfigError, match=r"objective\.name='foo': expected 'ar' or 'star'"):
        load_config(None, ["objective=foo"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=B", "train.steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(again, Config)


def test_every_recipe_and_sweep_file_loads():
    from pathlib import Path

    from star_scale.sweep import load_sweep

    root = Path(__file__).parents[2] / "recipes"
    sweeps = sorted((root / "sweeps").glob("*.yaml"))
    recipes = sorted(set(root.rglob("*.yaml")) - set(sweeps))
    assert len(recipes) >= 12 and sweeps
    for r in recipes:
        load_config(r)
    for s in sweeps:
        assert load_sweep(s).runs
