"""Checks on the real ML-1M when it is on disk (../shared/data or $CFAE_DATA_DIR); skipped elsewhere."""

import os
from pathlib import Path

import pytest

from cfae.data.movielens import DATASETS, read_ratings
from cfae.data.ratings import build_matrix

ROOT = Path(os.environ.get("CFAE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
RATINGS = ROOT / "ml-1m" / "ratings.dat"


@pytest.mark.skipif(not RATINGS.is_file(), reason=f"real ML-1M not found at {RATINGS}")
def test_ml1m_counts_after_the_studys_filter():
    spec = DATASETS["ml1m"]
    ratings = read_ratings(RATINGS, spec.separator)
    assert len(ratings.ratings) == 1_000_209
    stats = build_matrix(ratings, min_item_ratings=10).stats
    assert (stats["n_users"], stats["n_items"], stats["n_ratings"]) == (6040, 3260, 998_539)
    assert (stats["dropped_items"], stats["dropped_ratings"]) == (446, 1670)
