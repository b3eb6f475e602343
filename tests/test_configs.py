import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import get_class

from cfae.checks import ConfigError, check_config
from cfae.configs import HANDED_OVER, compose, constructor_defaults, layers, with_model_defaults
from cfae.models import AutoRec, DeepAutoencoder, RatingModel

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_a_model_config_names_every_constructor_argument_so_each_can_be_overridden(name):
    model = compose(f"model={name}").model
    cls = get_class(model._target_)
    expected = set(constructor_defaults(cls)) - HANDED_OVER
    if getattr(cls, "output_layer", None) is RatingModel.output_layer:  # not an autoencoder: no output to sample
        expected.discard("sampled_output")
    if cls.closed_form:  # no optimizer, so no weight decay, and no training to start
        expected -= {"weight_decay", "start_at_mean"}
    assert expected <= set(model), f"conf/model/{name}.yaml lacks {sorted(expected - set(model))}"


def test_a_null_key_takes_the_constructors_default_and_a_knob_wins_over_it():
    autorec = with_model_defaults(compose("model=autorec")).model
    signature = inspect.signature(AutoRec).parameters
    assert autorec.hidden_size == signature["hidden_size"].default == 500
    assert autorec.noise == signature["noise"].default and autorec.weight_decay == 3e-4  # the config's own
    assert with_model_defaults(compose("model=autorec", "hidden=300")).model.hidden_size == 300
    assert with_model_defaults(compose("model=denoising")).model.noise == 0.2  # the row's value, not AutoRec's
    assert with_model_defaults(compose("model=denoising", "noise=0.5")).model.noise == 0.5
    deep = with_model_defaults(compose("model=deep")).model
    assert deep.dropout == inspect.signature(DeepAutoencoder).parameters["dropout"].default
    assert list(deep.layer_sizes) == [300, 500, 750]
    assert list(with_model_defaults(compose("model=deep", "hidden=64")).model.layer_sizes) == [64, 64, 64]


def test_constructor_defaults_follow_kwargs_up_to_the_base_class():
    defaults = constructor_defaults(AutoRec)
    assert defaults["hidden_size"] == 500 and defaults["weight_decay"] == 0.0  # the second from RatingModel
    assert "layer_sizes" not in constructor_defaults(DeepAutoencoder)  # required: each row names its own


def test_layers_takes_the_row_for_a_knob_left_null():
    assert layers(None, None, 300, 500, 750) == [300, 500, 750]
    assert layers(128, None, 300, 500, 750) == [128, 128, 128]
    assert layers(None, 2, 300, 500, 750) == [750, 750]


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=vae", "dropout=0.3"],
     "dropout=0.3: cfae.models.VAE has no use for this knob; it takes hidden, depth, noise"),
    (["model=bias", "hidden=8"], "hidden=8: cfae.models.MatrixFactorization has no use for this knob; it takes none"),
    (["model=svd", "noise=0.1"], "noise=0.1: cfae.models.ImputedSVD has no use for this knob; it takes hidden"),
])
def test_a_knob_the_model_does_not_use_is_refused_not_ignored(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(compose(*overrides))
    assert str(err.value) == message


def test_importing_cfae_changes_nothing_global():
    probe = """
import warnings, logging
from omegaconf import OmegaConf
def state():
    return list(warnings.filters), {n: logging.getLogger(n).level for n in logging.root.manager.loggerDict}
import lightning, torch, optuna, mlflow, hydra, sqlalchemy  # the libraries' own import-time changes are theirs
resolvers = [n for n in ("or", "layers", "precision") if OmegaConf.has_resolver(n)]
before = state()
import cfae, cfae.train, cfae.sweep, cfae.study, cfae.report, cfae.models, cfae.data, cfae.configs
after = state()
assert before[0] == after[0], "warning filters changed"
assert [n for n in ("or", "layers", "precision") if OmegaConf.has_resolver(n)] == resolvers == [], "resolvers"
changed = {n for n in before[1] if before[1][n] != after[1].get(n)}
assert not changed, f"logger levels changed: {changed}"
print("unchanged")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "unchanged", done.stderr[-2000:]


def test_a_models_import_leaves_the_data_module_and_the_downloader_unloaded():
    probe = "import sys, cfae.models; print(sorted(m for m in sys.modules if m.startswith('cfae.data')))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "['cfae.data', 'cfae.data.means']", done.stderr[-2000:]


@pytest.mark.parametrize("model", ["deep", "vae", "autorec"])
def test_the_whole_run_prints_resolved_with_every_model_argument(model, capsys):
    from cfae import configs

    assert configs.main([f"model={model}", "depth=2"] if model != "autorec" else [f"model={model}"]) == 0
    printed = capsys.readouterr().out
    assert "hidden_size: 500" in printed if model == "autorec" else "layer_sizes:" in printed
    from omegaconf import OmegaConf

    assert None not in OmegaConf.create(printed).model.values()  # no model argument left null
    done = subprocess.run([sys.executable, "train.py", f"model={model}", "--cfg", "job", "--resolve"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "_target_: cfae.models." in done.stdout, done.stderr[-2000:]


def test_a_misspelt_null_model_key_is_refused_not_dropped():
    with pytest.raises(ConfigError, match=r"^model.gausian_noise: AutoRec takes no such argument"):
        with_model_defaults(compose("model=autorec", "+model.gausian_noise=null"))


def test_early_stopping_watches_the_metric_the_models_log():
    from cfae.metrics import VAL_RMSE

    assert compose().callbacks.early_stopping.monitor == VAL_RMSE


def test_the_configs_say_each_thing_once():
    """Every model config has one shape (`@package _global_`, its arguments under `model:`); no two configs of a
    group hold the same settings (search spaces, data sets, the study's recipe: shared ones are included)."""
    for name in MODEL_CONFIGS:
        assert (ROOT / "conf" / "model" / f"{name}.yaml").read_text().startswith("# @package _global_\n"), name
    for group in ("model", "data", "search_space", "experiment", "optimizer", "task"):
        bodies = {}
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            lines = [line.split("#")[0].rstrip() for line in path.read_text().splitlines()]
            lines = [line for line in lines if line.strip()]
            own = [line for line in lines if line != "defaults:" and not line.lstrip().startswith("- ")]
            body = "\n".join(lines)
            assert not own or body not in bodies, f"conf/{group}/{path.name} repeats {bodies.get(body)}"
            bodies.setdefault(body, path.name)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_a_models_bounds_are_stated_once_and_refused_up_front_and_by_its_constructor_alike(name):
    from omegaconf import OmegaConf

    from cfae.checks import RULES, bounds

    assert not [key for key, *_ in RULES if key.startswith("model.")]  # the models' bounds live in their constructors
    cfg = compose(f"model={name}")
    cls = get_class(cfg.model._target_)
    arguments = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                 if k != "_target_" and v is not None}
    taken = {p for klass in cls.__mro__ if "__init__" in vars(klass) for p in inspect.signature(klass).parameters}
    given = {k: 10 for k in ("n_inputs", "n_rows") if k in taken}
    for key in bounds(cls):
        bad = [] if key.endswith("layer_sizes") else -1
        with pytest.raises(ConfigError) as up_front:
            check_config(compose(f"model={name}", f"++model.{key}={bad}"))
        with pytest.raises(ConfigError) as built:
            cls(**{**given, **arguments, key: bad})
        assert str(up_front.value) == str(built.value) == f"model.{key}={bad}: must be {bounds(cls)[key][1]}"
