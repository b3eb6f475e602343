"""cfae on a CUDA GPU: every model trains there to the CPU's accuracy, the training matrix is held there,
and bf16 mixed precision costs no accuracy. Skipped without a GPU; `benchmarks/gpu_check.sh` runs them."""

import lightning as L
import pytest
import torch
from helpers import MODELS, ROOT
from hydra import compose, initialize_config_dir

from cfae.data import RatingsDataModule
from cfae.models import AutoRec
from cfae.sparse import SparseRows
from cfae.train import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]
GPU, CUDA = "gpu", "cuda"  # Lightning's accelerator, torch's device type


def final_rmse(data_root, tmp_path, accelerator: str, *overrides: str) -> float:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.root={data_root}", "data.download=false", "data.batch_size=16", "trainer.max_epochs=15",
            f"trainer.accelerator={accelerator}", "trainer.devices=1", "trainer.enable_progress_bar=false",
            "logger=none", f"output_dir={tmp_path / accelerator}", *overrides])
    return train(cfg)["test/rmse"]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_on_the_gpu_to_the_cpus_accuracy(name, data_root, tmp_path):
    overrides = [f"model={name}", "trainer.precision=32-true", *MODELS[name]]
    on_gpu = final_rmse(data_root, tmp_path, GPU, *overrides)
    on_cpu = final_rmse(data_root, tmp_path, "cpu", *overrides)
    # same initial weights and batches; noise and dropout draw from the device's own generator, and the
    # GPU sums in another order, so the two runs end close but not equal
    assert on_gpu == pytest.approx(on_cpu, rel=0.03), (on_gpu, on_cpu)


def test_bf16_mixed_precision_on_the_gpu_costs_no_accuracy(data_root, tmp_path):
    full = final_rmse(data_root, tmp_path / "32", GPU, "trainer.precision=32-true", *MODELS["autorec"])
    mixed = final_rmse(data_root, tmp_path / "bf16", GPU, "trainer.precision=bf16-mixed", *MODELS["autorec"])
    assert mixed == pytest.approx(full, abs=0.01), (mixed, full)


def test_the_training_matrix_is_held_on_the_gpu_and_batches_are_cut_there(data_root):
    devices = []

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert isinstance(batch, SparseRows)
            devices.append((batch.val.device.type, pl_module.device.type))

    dm = RatingsDataModule(root=str(data_root), download=False, batch_size=48)
    dm.setup()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Recorder()], accelerator=GPU, devices=1)
    trainer.fit(AutoRec(n_inputs=dm.n_cols, hidden_size=8, optimizer=torch.optim.Adam), datamodule=dm)
    assert dm.holds_batches_on_device(torch.device(CUDA))  # `auto` holds the matrix on a GPU with room for it
    assert devices and set(devices) == {(CUDA, CUDA)}
