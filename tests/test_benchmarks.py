"""The benchmark scripts measure what they say."""

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_a_level_is_the_first_epoch_at_or_below_it(benchmark):
    Result = benchmark("time_to_accuracy").Result
    r = Result(fit_s=9.0, rmse=0.86, curve=[(1.0, 0.95), (2.0, 0.87), (3.0, 0.88), (4.0, 0.85)])
    assert r.seconds_to(0.87) == 2.0 and r.seconds_to(0.88) == 2.0 and r.seconds_to(0.85) == 4.0
    assert r.seconds_to(0.84) == math.inf
    peer = Result(fit_s=5.0, rmse=0.874)  # no curve: the level is reached when the fit ends, or never
    assert peer.seconds_to(0.8725) == math.inf and peer.seconds_to(0.9) == 5.0


def test_the_test_curve_is_the_test_rmse_of_each_epochs_weights(benchmark, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CFAE_DATA_DIR", str(data_root))
    monkeypatch.chdir(tmp_path)
    tta = benchmark("time_to_accuracy")
    one = tta.cfae_arm(["hidden=16", "data.batch_size=32", "trainer.max_epochs=1"], tmp_path, seed=0)
    assert len(one.curve) == 1 and one.curve[0][1] == pytest.approx(one.rmse, abs=1e-6)  # its only epoch is its best
    three = tta.cfae_arm(["hidden=16", "data.batch_size=32", "trainer.max_epochs=3"], tmp_path, seed=0)
    seconds = [s for s, _ in three.curve]
    assert len(seconds) == 3 and 0 < seconds[0] < seconds[1] < seconds[2] <= three.fit_s
    assert three.curve[0][1] == pytest.approx(one.rmse, abs=1e-6)  # same seed: the same first epoch
    assert any(r == pytest.approx(three.rmse, abs=1e-6) for _, r in three.curve)  # the best validation epoch's


def test_surprise_sees_the_same_training_and_test_ratings_as_cfae(benchmark, data_root, monkeypatch):
    pytest.importorskip("surprise")
    monkeypatch.setenv("CFAE_DATA_DIR", str(data_root))
    train_val, test, dm = benchmark("time_to_accuracy").surprise_data(["data.fold=1"])
    assert dm.fold == 1
    assert train_val.n_ratings == dm.test_inputs.nnz and len(test) == dm.test_matrix.nnz
    cells = {(train_val.to_raw_uid(u), train_val.to_raw_iid(i)) for u, i, _ in train_val.all_ratings()}
    held_out = {(u, i) for u, i, _ in test}
    assert cells == set(zip(*dm.test_inputs.nonzero())) and not cells & held_out


@pytest.mark.slow
def test_time_to_accuracy_prints_every_arm_and_the_ratio(data_root, tmp_path):
    pytest.importorskip("surprise")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--repeats", "2",
                           "--arms", "surprise_default,cfae_default", "--overrides",
                           "hidden=16 data.batch_size=32 trainer.max_epochs=3"],
                          cwd=tmp_path, env={**os.environ, "CFAE_DATA_DIR": str(data_root)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert sum(line.startswith("repeat ") for line in lines) == 4
    last = dict(item.split("=") for item in lines[-1].split())
    assert set(last) == {"s_to_surprise_default", "surprise_default_fit_s", "ratio"}
    assert float(last["surprise_default_fit_s"]) > 0


def test_the_autorec_floor_counts_each_product_and_adam_step(benchmark):
    epoch_time = benchmark("epoch_time")
    h = epoch_time.HIDDEN
    floors = epoch_time.autorec_floor(n_rows=10, n_cols=20, nnz=30, batch_size=4, rate=1e9, bandwidth=1e8)
    params = 20 * h + h + h * 20 + 20  # encoder W, b; decoder V, c
    adam = 3 * 7 * 4 * params  # 3 steps (batches of 4, 4, 2 rows)
    assert floors["dense"][1:] == (6 * 10 * 20 * h + 4 * 30 * h, adam + 3 * 3 * 4 * 20 * h)
    assert floors["sampled"][1:] == (6 * 30 * h + 4 * 30 * h, adam + 3 * 4 * 30 * h)
    for seconds, flops, moved in floors.values():
        assert seconds == max(flops / 1e9, moved / 1e8)


def test_the_gpu_check_says_in_one_line_that_it_has_no_gpu_to_check():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: benchmarks/gpu_check.sh would run in earnest")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"gpu_check: torch {torch.__version__} sees no CUDA GPU here (") and " cores, " in line


@pytest.mark.slow
def test_seed_spread_runs_each_seed_and_prints_the_spread(data_root, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seed_spread.py"), "hidden=16", "--seeds", "2",
                           "data.batch_size=32", "trainer.max_epochs=2"],  # overrides around an option
                          cwd=tmp_path, env={**os.environ, "CFAE_DATA_DIR": str(data_root)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    tests = [float(line.split("test RMSE ")[1].split(",")[0]) for line in lines if line.startswith("seed ")]
    assert len(tests) == 2 and tests[0] != tests[1]  # two seeds, two different runs
    last = dict(item.split("=") for item in lines[-1].split())
    assert float(last["mean"]) == pytest.approx(sum(tests) / 2, abs=1e-4)
    assert float(last["worst_minus_mean"]) == pytest.approx(max(tests) - sum(tests) / 2, abs=2e-4)
    assert last["failed"] == "0"


@pytest.fixture
def logging_levels():
    """The levels the scripts' main() sets for cfae and mlflow, put back: later tests read cfae's warnings."""
    saved = {name: logging.getLogger(name).level for name in ("cfae", "mlflow")}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)  # setLevel, not the attribute: it also clears the loggers' caches


def test_a_seed_that_diverges_is_counted_as_failed_and_the_others_go_on(benchmark, data_root, monkeypatch, capsys,
                                                                        logging_levels):
    monkeypatch.setenv("CFAE_DATA_DIR", str(data_root))
    seed_spread = benchmark("seed_spread")
    real = seed_spread.train

    def diverging_at_seed_1(cfg):
        if cfg.seed == 1:
            raise RuntimeError("training diverged")
        return real(cfg)

    monkeypatch.setattr(seed_spread, "train", diverging_at_seed_1)
    monkeypatch.setattr(sys, "argv", ["seed_spread.py", "--seeds", "3", "hidden=16", "data.batch_size=32",
                                      "trainer.max_epochs=1"])
    seed_spread.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == "seed 1: failed: RuntimeError: training diverged"
    assert lines[-1].endswith(" failed=1") and sum(line.startswith("seed ") for line in lines) == 3
