"""Run configurations: composed in Python as `python train.py <overrides>` composes them (for notebooks,
scripts and the study runner), the resolvers the YAML files use, and the model's constructor defaults
written into a run's config so that it records every value it ran with.

    import cfae
    cfg = cfae.compose("model=vae", "data=ml100k", "trainer.max_epochs=20")
    trained = cfae.fit(cfg)          # the model with its best weights, its data, metrics, MLflow run id
"""

from __future__ import annotations

import inspect
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from cfae.checks import KNOBS, ConfigError

# conf/ at a clone's top, where an editable install finds it; cfae/conf/ in an installed wheel (pyproject.toml)
CONF = next((p for p in (Path(__file__).resolve().parents[1] / "conf", Path(__file__).parent / "conf")
             if (p / "train.yaml").is_file()), Path(__file__).parent / "conf")

# What the data and the optimizer group give every model (cfae/train.py): never a model config's to set.
HANDED_OVER = {"n_inputs", "n_rows", "rating_min", "rating_max", "train_mean", "optimizer", "scheduler"}


def layers(hidden: int | None, depth: int | None, *row: int) -> ListConfig:
    """Encoder layer sizes from the sweep knobs: `depth` layers of width `hidden`, each knob left null
    taking the model's row (`row`, the study's layer sizes) for its value."""
    if hidden is None and depth is None:
        return OmegaConf.create(list(row))
    return OmegaConf.create([hidden if hidden is not None else row[-1]] * (depth if depth is not None else len(row)))


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 (Intel Sapphire Rapids and later), from the flags Linux
    lists in /proc/cpuinfo; False elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def precision(accelerator: str = "auto") -> str:
    """Lightning's `precision` for the hardware: bf16 mixed precision (weights, optimizer state and loss in
    float32, matrix products in bfloat16) where the chip multiplies bfloat16 natively (CUDA GPUs that
    support it, CPUs with AMX tiles), else float32 (docs/performance.md has the measurements)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if accelerator in ("auto", "cpu") and cpu_has_amx() else "32-true"


def split_name(split: str, fold: int) -> str:
    """What a run holds out, for names: fold0 (random), users-fold0 (held-out users), else the split (u1,
    temporal, leave_last)."""
    return f"fold{fold}" if split == "random" else f"users-fold{fold}" if split == "users" else split


def data_name(dataset: str, path: str | None = None) -> str:
    """The data's short name, for names: the release (ml1m), or a table's file name without its suffix."""
    return Path(path).stem if dataset == "table" and path else dataset


def register_resolvers() -> None:
    """The resolvers conf/ uses; called by the entry points, `compose` and `fit`, never on import."""
    # `${or:${noise},0.2}`: a knob's value, or the row's own value while the knob is null.
    OmegaConf.register_new_resolver("or", lambda value, default: default if value is None else value, replace=True)
    OmegaConf.register_new_resolver("layers", layers, replace=True)
    OmegaConf.register_new_resolver("precision", precision, replace=True)
    # `${terminal:}`: whether stderr is a terminal, where a progress bar can redraw itself (not a log file)
    OmegaConf.register_new_resolver("terminal", lambda: sys.stderr.isatty(), replace=True)
    # `${part:${data.split},${data.fold}}`: which part of the data a run holds out, for names: fold0, or u1
    OmegaConf.register_new_resolver("part", split_name, replace=True)
    # `${data_name:${data.dataset},${data.path}}`: ml1m, or a table's file name
    OmegaConf.register_new_resolver("data_name", data_name, replace=True)


def compose(*overrides: str, config_name: str = "train") -> DictConfig:
    """The configuration `python train.py *overrides` would run. Its output folder is a new one under
    ./outputs/ unless `output_dir=` is given, and the groups chosen (`model=`, `+experiment=`) are kept in
    `cfg.choices`, where train.py reads them from Hydra, for run names and tags."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.choices = {group: cfg.hydra.runtime.choices.get(group) for group in ("model", "experiment")}
        del cfg["hydra"]
        if not any(o.startswith("output_dir=") for o in overrides):
            cfg.output_dir = str(Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S.%f"))
    return cfg


def constructor_defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of `cls(...)`, following `**kwargs` up to the base classes that take them."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        for p in parameters:
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                defaults.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return defaults


def with_model_defaults(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg`, resolved, whose `model` holds every constructor argument: a key the model config
    leaves out, or sets to null (a sweep knob left null), takes the constructor's default. One home per
    default (the model's signature), and a run's config and MLflow params still show every value."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cls = get_class(cfg.model._target_)
    given = {k: v for k, v in cfg.model.items() if v is not None}
    defaults = {k: list(v) if isinstance(v, tuple) else v
                for k, v in constructor_defaults(cls).items() if k not in HANDED_OVER}
    unknown = sorted(k for k, v in cfg.model.items() if v is None and k not in defaults)
    if unknown:  # a misspelt key must not vanish
        raise ConfigError(f"model.{unknown[0]}: {cls.__name__} takes no such argument with a default "
                          f"(it takes {', '.join(sorted(defaults))})")
    cfg.model = {"_target_": given.pop("_target_"), **defaults, **given}
    return cfg


def knob_values(composed: DictConfig, resolved: DictConfig) -> dict[str, Any]:
    """The value each sweep knob a model takes ran with, read from the model argument it feeds (`composed`,
    its interpolations unresolved, says which; `resolved`, with the constructor's defaults, says the value):
    `hidden` the latent size (a layer list's width where its layers are alike, else the list), `depth` the
    number of layers, `dropout` and `noise` themselves. What the runs table shows in its knob columns."""
    raw = OmegaConf.to_container(composed, resolve=False)
    values = {}
    for knob in KNOBS:
        fed = [key for key, value in raw.items() if isinstance(value, str) and "${" + knob + "}" in value]
        if not fed:
            continue
        value = resolved[fed[0]]
        if isinstance(value, ListConfig | list):  # layer sizes
            value = list(value)
            value = len(value) if knob == "depth" else value[0] if len(set(value)) == 1 else ",".join(map(str, value))
        values[knob] = value
    return values


def main(argv: list[str] | None = None) -> int:
    """`python -m cfae.configs <overrides>`: the whole run `python train.py <overrides>` would make, every
    model argument included (what its config.yaml will hold)."""
    import sys

    from cfae.checks import reported_in_one_line

    with reported_in_one_line():
        cfg = with_model_defaults(compose(*(sys.argv[1:] if argv is None else argv)))
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
