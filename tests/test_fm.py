"""The Bayesian FM: its features, and that its posterior mean is myFM's own prediction."""

import numpy as np
import pytest
import scipy.sparse as sp

from cfae.checks import ConfigError
from cfae.models import BayesianFM
from cfae.models.fm import draw, features
from cfae.sparse import SparseRows


def ratings(n_rows=60, n_cols=40, density=0.3, seed=1) -> sp.csr_matrix:
    m = sp.random(n_rows, n_cols, density=density, random_state=seed, format="csr")
    m.data = np.random.default_rng(seed).integers(1, 6, m.nnz).astype(np.float64)
    return m


def test_implicit_features_are_the_one_hot_beside_who_rated_what_over_the_square_root_of_its_count():
    m = sp.csr_matrix(np.array([[5, 0, 3], [0, 0, 1]], dtype=float))
    rows, cols = features(m, implicit=True)
    np.testing.assert_allclose(rows.toarray(), [[1, 0, 2**-0.5, 0, 2**-0.5], [0, 1, 0, 0, 1]])
    np.testing.assert_allclose(cols.toarray(), [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 2**-0.5, 2**-0.5]])
    rows, cols = features(m, implicit=False)
    assert (rows != sp.identity(2)).nnz == 0 and (cols != sp.identity(3)).nnz == 0
    zero = sp.csr_matrix((np.array([0.0, 3.0]), np.array([0, 2]), np.array([0, 1, 2])), shape=(2, 3))  # a stored 0
    np.testing.assert_allclose(features(zero, implicit=True)[0].toarray(), [[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]])


@pytest.mark.parametrize("implicit", [True, False])
def test_one_kept_sample_predicts_what_myfm_predicts_from_it(implicit):
    import myfm

    m, rank, seed = ratings(), 4, 3
    model = BayesianFM(n_inputs=40, n_rows=60, rank=rank, iterations=20, burn_in=19, samples=1, implicit=implicit,
                       seed=seed)
    model.solve(m)
    rows, cols = features(m, implicit)
    cells = m.tocoo()
    sizes = [60, 40, 40, 60] if implicit else [60, 40]
    fm = myfm.MyFMRegressor(rank=rank, random_seed=seed)
    fm.fit(None, cells.data, X_rel=[myfm.RelationBlock(cells.row, rows), myfm.RelationBlock(cells.col, cols)],
           grouping=np.repeat(np.arange(len(sizes)), sizes).tolist(), n_iter=20, n_kept_samples=1)
    u, i = np.divmod(np.arange(60 * 40), 40)  # every cell, rated or not
    expected = fm.predict(None, [myfm.RelationBlock(u, rows), myfm.RelationBlock(i, cols)])
    ours = model(SparseRows.from_csr(sp.csr_matrix((60, 40)), np.arange(60))).numpy().ravel()
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_the_prediction_is_the_mean_of_the_samples_after_the_burn_in():
    m = ratings(seed=5)
    model = BayesianFM(n_inputs=40, n_rows=60, rank=4, iterations=12, burn_in=2, samples=10, seed=0)
    model.solve(m)
    drawn = []
    draw(m, rank=4, iterations=12, implicit=True, seed=0, each=lambda i, s: drawn.append(
        s.mean + s.row_bias[:, None] + s.col_bias + s.row_factors @ s.col_factors.T))
    expected = np.mean(drawn[2:], axis=0)
    assert not np.allclose(drawn[2], expected, atol=1e-2)  # the samples differ: the mean is not any one of them
    ours = model(SparseRows.from_csr(sp.csr_matrix((60, 40)), np.arange(60))).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("knobs, message", [
    ({"burn_in": 20}, "model.burn_in=20: it must be from 0 to model.iterations - 1 = 19"),
    ({"samples": 16}, "model.samples=16: it must be from 1 to iterations - burn_in = 15"),
])
def test_sample_counts_outside_the_chain_are_refused(knobs, message):
    with pytest.raises(ConfigError, match=message):
        BayesianFM(n_inputs=4, n_rows=3, **{"iterations": 20, "burn_in": 5, **knobs})


def test_a_refitted_run_is_saved_loaded_and_recommends_and_refuses_users_it_has_not_seen(data_root, tmp_path, caplog):
    import logging

    import cfae
    from cfae.checks import UsageError

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    caplog.set_level(logging.INFO, logger="cfae.train")
    trained = cfae.fit(cfae.compose(
        "model=bayesian_fm", "hidden=4", "model.iterations=30", "model.samples=8", "refit=true",
        f"data.root={data_root}", "data.download=false", "ranking=null", f"logger.uri={uri}",
        f"output_dir={tmp_path / 'out'}"))
    assert "solved in closed form (" in caplog.text  # its end line: no epochs to speak of, its fit time
    assert trained.metrics["refit/epochs"] == 0  # solved again on training + validation: another chain
    assert trained.metrics["test/rmse"] != pytest.approx(trained.metrics["test/rmse_before_refit"], abs=1e-6)
    rec = cfae.load(trained.run_id, tracking_uri=uri)
    user = int(trained.datamodule.user_ids[0])
    top = rec.recommend(user, 5)
    assert len(top) == 5 and [r.rating for r in top] == sorted((r.rating for r in top), reverse=True)
    with pytest.raises(UsageError, match="BayesianFM with item rows cannot score a user it has not seen"):
        rec.recommend_for([top[0].item_id], 5)
