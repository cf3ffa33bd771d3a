from pathlib import Path

import pytest

from workflows.config import Config, ConfigError, flatten, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_yaml_and_overrides():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["label.w_q=1.4", "train.deepspeed.zero_stage=2", "data.fps=null"])
    assert isinstance(cfg, Config)
    assert cfg.name == "tiny" and cfg.data.size == 64
    assert cfg.label.w_q == 1.4 and isinstance(cfg.label.w_q, float)
    assert cfg.train.deepspeed.zero_stage == 2
    assert cfg.data.fps is None


def test_int_promotes_to_float_and_tuples():
    cfg = load_config(None, ["train.lr=1", "train.betas=[0.5, 0.9]"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.5, 0.9)


@pytest.mark.parametrize("override, needle", [
    ("label.wq=1.0", "unknown key"),            # a typo must not pass silently
    ("train.steps=many", "expected int"),
    ("train.steps=true", "expected an integer"),
    ("data=3", "expected a mapping"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_are_clear_errors(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_every_recipe_in_configs_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_flatten_for_mlflow_params():
    flat = flatten(to_dict(load_config()))
    assert flat["train.deepspeed.zero_stage"] == 0
    assert "label.w_q" in flat


def test_exponent_without_dot_is_a_float_and_junk_is_an_error():
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["train.lr=fast"])


def test_per_model_sections_resolve_for_the_model_being_trained(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 100\n  lr: 1.0e-4\n  deepspeed: {zero_stage: 1}\n  router: r.pt\n"
                      "proxy: {steps: 600, lr: 2.0e-3, deepspeed: {precision: bf16}}\n"
                      "router: {steps: 300}\n")
    proxy = load_config(recipe, ["train.model=proxy"]).train
    assert (proxy.steps, proxy.lr) == (600, 2e-3)
    assert (proxy.deepspeed.zero_stage, proxy.deepspeed.precision) == (1, "bf16")  # nested sections merge
    router = load_config(recipe, ["train.model=router"]).train
    assert (router.steps, router.lr, router.deepspeed.precision) == (300, 1e-4, "fp32")
    final = load_config(recipe, ["train.model=final"]).train
    assert final.steps == 100  # no section: the common keys
    # command-line overrides win over the recipe's per-model keys, in either spelling
    assert load_config(recipe, ["train.model=proxy", "train.steps=7"]).train.steps == 7
    assert load_config(recipe, ["train.model=proxy", "proxy.steps=8"]).train.steps == 8
    assert load_config(recipe, ["train.model=router", "proxy.steps=8"]).train.steps == 300
    assert load_config(recipe, ["train.model=final"]).train.router == "r.pt"  # the URI field is untouched


@pytest.mark.parametrize("override, needle", [
    ("ar.stepz=3", r"unknown key.*\bar\b"),   # checked even when another model is trained
    ("router.lr=fast", "expected a number"),
    ("final.model=ar", "chosen by the command"),
    ("final=3", "is a section"),
])
def test_per_model_sections_are_checked(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(REPO / "configs" / "tiny.yaml", ["train.model=proxy", override])
