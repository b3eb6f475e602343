"""task=ranking: top-N from clicks under vae_cf's protocol; its metrics by hand, its models, its refusals."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cfae
from cfae.checks import UsageError
from cfae.data import RatingsDataModule
from cfae.metrics import TopK
from cfae.models import EASE, Popularity
from cfae.sparse import SparseRows

RANKING = ["task=ranking", "data.heldout_users=30", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
           "data.batch_size=64"]


def rows(dense: list[list[float]]) -> SparseRows:
    return SparseRows.from_csr(sp.csr_matrix(np.array(dense, dtype=np.float32)), np.arange(len(dense)))


def test_ndcg_and_recall_against_a_three_user_example_by_hand():
    neg = float("-inf")
    scores = torch.tensor([[neg, 0.8, 0.7, 0.1, 0.2, 0.3],    # user 0 was given item 0: 1, 2, 5, 4, 3
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],    # user 1: 5, 4, 3, 2, 1, 0
                           [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])   # user 2 holds nothing out: not averaged
    held_out = rows([[0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    ndcg, recall = TopK("ndcg", 2), TopK("recall", 2)
    ndcg.update(scores, held_out)
    recall.update(scores, held_out)
    # user 0: top 2 = items 1 (held out), 2: DCG 1, ideal 1 + 1/log2(3) = 1.63093 -> 0.61315; recall 1 / min(2, 2)
    # user 1: top 2 = items 5 (held out), 4: DCG 1, ideal 1 (one held out) -> 1; recall 1 / min(2, 1) = 1
    assert ndcg.compute().item() == pytest.approx((0.61315 + 1) / 2, abs=1e-5)
    assert recall.compute().item() == pytest.approx((0.5 + 1) / 2)
    ndcg100 = TopK("ndcg", 100)  # k beyond the items: every item is ranked
    ndcg100.update(scores, held_out)
    # user 0: items 1 and 3 at ranks 1 and 5 (1, 2, 5, 4, 3): DCG 1 + 1/log2(6); ideal 1 + 1/log2(3)
    expected_0 = (1 + 1 / np.log2(6)) / (1 + 1 / np.log2(3))
    assert ndcg100.compute().item() == pytest.approx((expected_0 + 1) / 2, abs=1e-5)


def test_clicks_are_the_ratings_above_the_threshold_and_users_with_fewer_than_five_go():
    frame = pd.DataFrame({"user": [1] * 6 + [2] * 6, "item": list(range(6)) * 2,
                          "rating": [5, 4, 4, 4, 4, 3] + [5, 5, 5, 5, 1, 2]})
    dm = RatingsDataModule("table", columns={"user": "user", "item": "item", "rating": "rating"},
                           clicks_above=3.5, min_item_ratings=0, min_user_ratings=5, orientation="user",
                           test_fraction=0.2, val_fraction=0.2).use_frame(frame)
    dm.setup()  # user 1 has 5 ratings above 3.5, user 2 has 4: dropped
    assert (dm.user_ids.tolist(), dm.stats["n_ratings"]) == ([1], 5)
    users = pd.DataFrame({"user": np.repeat(np.arange(40), 8), "item": np.tile(np.arange(8), 40),
                          "rating": np.where(np.arange(320) % 8 < 6, 5, 2)})
    dm = RatingsDataModule("table", columns={"user": "user", "item": "item", "rating": "rating"},
                           clicks_above=3.5, min_item_ratings=0, min_user_ratings=5, orientation="user",
                           split="users", heldout_users=5).use_frame(users)
    dm.setup()
    assert dm.stats["n_ratings"] == 40 * 6 and dm.rating_range == (0.0, 1.0)
    assert set(np.unique(dm.test_inputs.data)) == {1.0}


def test_ease_is_stecks_closed_form_and_popularity_counts_clicks():
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((30, 12)) < 0.3).astype(np.float32))
    ease = EASE(n_inputs=12, l2=5.0)
    ease.solve(x)
    # Steck (2019), algorithm 1, as printed: G = X^T X + l2 I; P = G^-1; B = P / (-diag(P)); diag(B) = 0
    g = x.T.toarray() @ x.toarray() + 5.0 * np.eye(12)
    p = np.linalg.inv(g)
    b = p / (-np.diag(p))
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(ease.weight.numpy(), b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ease(rows(x[:3].toarray().tolist())).numpy(), x[:3].toarray() @ b, rtol=1e-4, atol=1e-5)
    pop = Popularity(n_inputs=12)
    pop.solve(x)
    assert pop.clicks.tolist() == np.asarray(x.sum(axis=0)).ravel().tolist()


def test_mult_vae_anneals_beta_as_vae_cf_does():
    from cfae.models import MultVAE

    model = MultVAE(n_inputs=12, layer_sizes=[8, 4], beta_max=0.2, anneal_steps=1000)
    # vae_cf: anneal = min(anneal_cap, update_count / total_anneal_steps): the cap is reached at 200 of 1000 updates
    assert [model.kl_weight(s) for s in (0, 100, 200, 1000, 5000)] == pytest.approx([0, 0.1, 0.2, 0.2, 0.2])


@pytest.mark.parametrize("model", ["multvae", "multdae", "recvae", "ease", "pop"])
def test_each_ranking_model_trains_and_reports_vae_cfs_three_test_metrics(model, data_root, tmp_path):
    cfg = cfae.compose(*RANKING, f"model={model}", f"data.root={data_root}", "data.download=false",
                       f"logger.uri=sqlite:///{tmp_path}/mlflow.db", f"output_dir={tmp_path}/out")
    trained = cfae.fit(cfg)
    tested = ("test/ndcg_at_100", "test/recall_at_20", "test/recall_at_50")
    assert {*tested, "val/ndcg_at_100_best"} <= set(trained.metrics)
    assert all(0 <= trained.metrics[k] <= 1 for k in tested)
    rec = cfae.load(trained.run_id, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert len(rec.recommend(3, k=5)) == 5
    given = [int(i) for i in rec.item_ids[:6]]  # a user the model never saw, given by six clicks
    fresh = rec.recommend_for(given, k=5)
    assert len(fresh) == 5 and not {r.item_id for r in fresh} & set(given)


def test_a_model_must_do_the_task_asked(data_root, tmp_path):
    from cfae.train import check_task

    with pytest.raises(UsageError, match="model=autorec predicts ratings; task=ranking takes multvae"):
        check_task(cfae.compose("task=ranking", "model=autorec"))
    with pytest.raises(UsageError, match="model=multvae ranks items from clicks: add task=ranking"):
        check_task(cfae.compose("model=multvae"))


RANKING_PLAN = """
name: ranking-mini
folds: [0, 1]
rows: [multdae, ease, pop]
protocols:
  synthetic: {overrides: []}
figure_folds: [0]
figures:
  ranking_latent_size: {experiment: multvae, knob: hidden, values: [8, 16]}
"""


def test_the_ranking_study_runs_and_its_report_has_its_table_and_figure(data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from cfae import report, study

    (tmp_path / "plan.yaml").write_text(RANKING_PLAN)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert study.main(["--config", str(tmp_path / "plan.yaml"), "--output-dir", str(tmp_path / "out"), "--jobs", "2",
                       "--",
                       f"data.root={data_root}", "data.download=false", "data.heldout_users=30",
                       "trainer.max_epochs=2", "data.batch_size=64", f"logger.uri={uri}"]) == 0
    said = (tmp_path / "out" / "ranking-mini" / "ease" / "synthetic" / "fold1" / "run.log").read_text()  # its log
    assert "ease/synthetic/fold1 done in" in said and "test NDCG@100 0." in said
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cfae").experiment_id],
                              "tags.`cfae.study` = 'ranking-mini'")
    assert len(runs) == 3 * 2 + 2 and all(r.data.params["task/name"] == "ranking" for r in runs)
    result = report.report("ranking-mini", tmp_path / "reports", uri, log_to_mlflow=False)
    assert [r["row"] for r in result["rows"]] == ["multdae", "ease", "pop"] and result["missing"] == []
    assert all(r["folds"] == 2 and 0 < r["ndcg_at_100"] <= 1 and r["ndcg_at_100_ci"] >= 0 for r in result["rows"])
    text = (tmp_path / "reports" / "ranking-mini.md").read_text()
    assert "| NDCG@100 | Recall@20 | Recall@50 |" in text and "EASE (Steck)" in text
    assert (tmp_path / "reports" / "ranking_latent_size.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_ranking_sweep_maximises_validation_ndcg(data_root, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import optuna

    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "CFAE_DATA_DIR": str(data_root)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "sweep.py"), "-m", "task=ranking",
                           "model=ease", "data.heldout_users=30", "model.l2=choice(1,30,1000)"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="ease-ml1m-user-users-fold0",
                               storage=f"sqlite:///{tmp_path}/mlruns/optuna.db").trials
    best = max(trials, key=lambda t: t.value)
    assert len(trials) == 3 and f"best: val/ndcg_at_100_best={best.value:.4f}" in done.stdout
