import numpy as np
import pytest
import scipy.sparse as sp

from cfae.ranking import ranking_metrics


def test_recall_and_ndcg_by_hand():
    # 2 users x 5 items. User 0 rated item 0 (seen), held out: item 1 (5 stars), item 2 (2 stars), item 3 (4).
    seen = sp.csr_matrix(np.array([[5, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32))
    held_out = sp.csr_matrix(np.array([[0, 5, 2, 4, 0], [0, 0, 0, 0, 3]], dtype=np.float32))
    scores = np.array([[9.0, 4.0, 4.5, 1.0, 3.0],  # seen item 0 scores highest but must not count
                       [1.0, 2.0, 3.0, 4.0, 5.0]], dtype=np.float32)
    m = ranking_metrics(scores, seen, held_out, k=2)
    # user 1 has no held-out rating >= 4: not averaged. User 0: top 2 of items 1..4 = [2, 1]; relevant {1, 3}
    assert m["ranking_users"] == 1
    assert m["recall_at_2"] == pytest.approx(1 / 2)
    assert m["ndcg_at_2"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))


def test_an_oracle_scores_one_and_reversed_scores_score_zero():
    rng = np.random.default_rng(0)
    ratings = rng.integers(1, 6, size=(50, 40)).astype(np.float32) * (rng.random((50, 40)) < 0.3)
    held = rng.random((50, 40)) < 0.3
    seen, held_out = sp.csr_matrix(ratings * ~held), sp.csr_matrix(ratings * held)
    oracle = held_out.toarray() + 0.01 * rng.random((50, 40))  # relevant items first
    assert ranking_metrics(oracle, seen, held_out, k=3)["ndcg_at_3"] == pytest.approx(1.0)
    assert ranking_metrics(oracle, seen, held_out, k=3)["recall_at_3"] == pytest.approx(1.0)
    worst = ranking_metrics(-oracle, seen, held_out, k=3)  # unrated items outnumber k for every user here
    assert worst["recall_at_3"] == 0 and worst["ndcg_at_3"] == 0


@pytest.mark.parametrize("chunk", [7, 1000])
def test_scores_of_a_model_with_per_row_parameters_use_each_rows_own_parameters(chunk):
    """Chunking must not renumber rows: chunk 7 of 30 rows once scored rows 7.. with rows 0..'s factors."""
    import torch

    from cfae.models.baselines import MatrixFactorization
    from cfae.ranking import score_matrix

    torch.manual_seed(0)
    inputs = sp.random(30, 12, density=0.3, format="csr", random_state=0, dtype=np.float32)
    model = MatrixFactorization(n_inputs=12, n_rows=30, n_factors=3)
    for p in model.parameters():
        p.data.normal_()
    expected = (model.mean + model.row_bias[:, None] + model.col_bias + model.row_factors @ model.col_factors.T)
    np.testing.assert_allclose(score_matrix(model, inputs, chunk=chunk), expected.detach().numpy(), rtol=1e-5,
                               atol=1e-5)
