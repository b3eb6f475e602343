"""cfae as an installed package: `python -m cfae` and its commands, and a wheel that carries the configs."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cfae.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def cfae(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfae", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def test_python_m_cfae_lists_its_commands_and_refuses_others():
    listed = cfae("--help")
    assert listed.returncode == 0 and all(f"  {name} " in listed.stdout for name in COMMANDS)
    wrong = cfae("trian")
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: trian: not a cfae command")


def test_cfae_train_runs_train_py_from_anywhere(data_root, tmp_path):
    done = cfae("train", "hidden=8", "trainer.max_epochs=1", "logger=none", cwd=tmp_path, CFAE_DATA_DIR=str(data_root))
    assert done.returncode == 0, done.stderr[-3000:]
    (log,) = tmp_path.glob("outputs/*/*/train.log")
    assert "done after 1 epochs" in log.read_text()


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_composes_from_them(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("cfae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"cfae/conf/train.yaml", "cfae/conf/data/table.yaml", "cfae/conf/hydra/sweeper/optuna.yaml",
            "cfae/conf/hydra/sweeper/sampler/tpe.yaml", "cfae/pyfunc_model.py",
            "hydra_plugins/cfae_sweeper/__init__.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "conf/")) for n in names)
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    composed = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "import cfae, cfae.configs; print(cfae.configs.CONF); "
                               "print(cfae.compose('data=table', 'model=vae').model._target_)", str(installed)],
                              capture_output=True, text=True, cwd=tmp_path)
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert composed.stdout.split() == [str(installed / "cfae" / "conf"), "cfae.models.VAE"]
