"""Run configurations composed in Python, as `python train.py <overrides>` composes them, without Hydra's
runtime: for notebooks, scripts and the study runner.

    import cfae
    cfg = cfae.compose("model=vae", "data=ml100k", "trainer.max_epochs=20")
    trained = cfae.fit(cfg)          # the model with its best weights, its data, metrics, MLflow run id
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(*overrides: str, config_name: str = "train") -> DictConfig:
    """The configuration `python train.py *overrides` would run. Its output folder is a new one under
    ./outputs/ unless `output_dir=` is given, and the groups chosen (`model=`, `+experiment=`) are kept in
    `cfg.choices`, where train.py reads them from Hydra, for run names and tags."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.choices = {group: cfg.hydra.runtime.choices.get(group) for group in ("model", "experiment")}
        del cfg["hydra"]
        if not any(o.startswith("output_dir=") for o in overrides):
            cfg.output_dir = str(Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S.%f"))
    return cfg
