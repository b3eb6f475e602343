"""Ratings from a table of the user's own (CSV, TSV, Parquet, DataFrame) and the splits beside the random folds,
each checked on a small table written out here."""

import numpy as np
import pandas as pd
import pytest

import cfae
from cfae.checks import DataError
from cfae.data import RatingsDataModule
from cfae.data.splits import VAE_CF_SEED, split_leave_last, split_temporal, split_users
from cfae.data.tables import from_frame, read_table
from cfae.synthetic import planted_ratings

COLUMNS = {"user": "customer", "item": "product", "rating": "stars", "timestamp": "ts"}


def shop(n_users: int = 60, n_items: int = 40, seed: int = 0) -> pd.DataFrame:
    """Planted ratings with text ids and times, as a shop would export them."""
    r = planted_ratings(n_users=n_users, n_items=n_items, density=0.5, seed=seed)
    ts = 1_600_000_000 + np.random.default_rng(seed).permutation(len(r.ratings)) * 60
    return pd.DataFrame({"customer": [f"c{u}" for u in r.users], "product": [f"p{i}" for i in r.items],
                         "stars": r.ratings, "ts": ts})


def test_a_csv_tsv_parquet_and_dataframe_give_the_same_ratings(tmp_path):
    frame = shop()
    frame.to_csv(tmp_path / "r.csv", index=False)
    frame.to_csv(tmp_path / "r.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "r.parquet")
    read = [read_table(tmp_path / "r.csv", COLUMNS), read_table(tmp_path / "r.tsv", COLUMNS),
            read_table(tmp_path / "r.parquet", COLUMNS), from_frame(frame, COLUMNS)]
    for r in read:
        assert [r.user_id(i) for i in range(3)] == list(frame.customer[:3])
        assert [r.item_id(i) for i in range(3)] == list(frame["product"][:3])
        np.testing.assert_array_equal(r.ratings, frame.stars.to_numpy(np.float32))
        np.testing.assert_array_equal(r.timestamps, frame.ts.to_numpy())
    pd.DataFrame({"u": [7, 8, 9], "i": [10, 11, 12], "r": [4, 5, 3]}).to_csv(tmp_path / "n.csv", index=False)
    numbers = read_table(tmp_path / "n.csv", {"user": "u", "item": "i", "rating": "r"})
    assert numbers.user_names is None and numbers.users.tolist() == [7, 8, 9]  # integer ids stay integers


NO_TIME = COLUMNS | {"timestamp": None}


@pytest.mark.parametrize("text, expected", [
    ("customer,product,stars\nc1,p1,4\nc2,p2,x\n", r"r.csv line 3: rating 'x' is not a number"),
    ("customer,product,stars\nc1,p1,4\nc2,,3\n", r"r.csv line 3: no item \(an empty field\)"),
    ("customer,product,stars\nc1,p1,4\nc2,p2\n", r"r.csv line 3: expected 3 fields separated by ','"),
    ("customer,product,stars\nc1,p1,4\nc2,p2,9\n", r"r.csv line 3: rating 9 outside data.scale=\[1, 5\]"),
    ("customer,product\nc1,p1\n", r"data.columns.rating=stars: .*r.csv has no such column \(it has: customer, produc"),
    ("customer,product,stars\nc1,p1,4\n\nc2,p2,3\n", r"r.csv line 3: no user \(an empty field\)"),
])
def test_a_bad_table_is_refused_naming_its_file_line_and_value(tmp_path, text, expected):
    (tmp_path / "r.csv").write_text(text)
    with pytest.raises(DataError, match=expected):
        read_table(tmp_path / "r.csv", NO_TIME, scale=(1, 5))


def module(frame: pd.DataFrame, **kwargs) -> RatingsDataModule:
    dm = RatingsDataModule("table", columns=COLUMNS, download=False, min_item_ratings=0, **kwargs).use_frame(frame)
    dm.setup()
    return dm


def cells(dm, matrix) -> set[tuple[str, str]]:
    """(user id, item id) of each rating of a part."""
    m = matrix.tocoo() if dm.orientation == "user" else matrix.T.tocoo()
    return set(zip(dm.user_ids[m.row].tolist(), dm.item_ids[m.col].tolist()))


def test_the_scale_is_the_datas_own_or_the_one_given():
    frame = shop()
    assert module(frame).rating_range == (1.0, 5.0)
    assert module(frame, scale=[0, 10]).rating_range == (0, 10)


def test_a_temporal_split_tests_the_last_ratings_in_time():
    frame = shop()
    dm = module(frame, split="temporal", test_fraction=0.2, val_fraction=0.1)
    time = {(u, i): t for u, i, t in zip(frame.customer, frame["product"], frame.ts)}
    train, val, test = (cells(dm, m) for m in (dm.train_matrix, dm.val_matrix, dm.test_matrix))
    assert max(time[c] for c in train) < min(time[c] for c in val)
    assert max(time[c] for c in val) < min(time[c] for c in test)
    assert len(test) == round(0.2 * len(frame)) and len(train | val | test) == len(frame)
    # by hand: times 5, 1, 4, 2, 3 -> the last (0.2 of 5) is time 5, validation (0.25 of the rest) is time 4
    by_hand = split_temporal(np.array([5, 1, 4, 2, 3]), test_fraction=0.2, val_fraction=0.25)
    assert by_hand.test.tolist() == [0] and by_hand.val.tolist() == [2] and by_hand.train.tolist() == [1, 3, 4]


def test_leave_last_tests_each_users_last_ratings():
    users = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    times = np.array([4, 1, 3, 2, 9, 7, 8, 5, 6])
    split = split_leave_last(users, times, n=1)
    assert split.test.tolist() == [0, 4] and split.val.tolist() == [2, 6]  # user 2 has 2 = 2n ratings: all trained
    assert split.train.tolist() == [1, 3, 5, 7, 8]
    frame = shop()
    dm = module(frame, split="leave_last", leave_last=2)
    time = {(u, i): t for u, i, t in zip(frame.customer, frame["product"], frame.ts)}
    test = cells(dm, dm.test_matrix)
    for user, rated in frame.groupby("customer"):
        last = set(zip(rated.sort_values("ts").customer[-2:], rated.sort_values("ts")["product"][-2:]))
        assert last <= test and all(time[c] < min(time[t] for t in last) for c in cells(dm, dm.train_matrix)
                                    if c[0] == user)


def vae_cf_notebook(raw: pd.DataFrame, n_heldout: int, seed: int = VAE_CF_SEED) -> dict[str, pd.DataFrame]:
    """dawenl/vae_cf's ML-20M notebook, its steps as written there, on `raw` (userId, movieId rows)."""
    user_activity = raw.groupby("userId").size()
    unique_uid = user_activity.index
    np.random.seed(seed)
    idx_perm = np.random.permutation(unique_uid.size)
    unique_uid = unique_uid[idx_perm]
    n_users = unique_uid.size
    tr_users = unique_uid[:(n_users - n_heldout * 2)]
    vd_users = unique_uid[(n_users - n_heldout * 2): (n_users - n_heldout)]
    te_users = unique_uid[(n_users - n_heldout):]
    train_plays = raw.loc[raw["userId"].isin(tr_users)]
    unique_sid = pd.unique(train_plays["movieId"])

    def split_train_test_proportion(data, test_prop=0.2):
        data_grouped_by_user = data.groupby("userId")
        tr_list, te_list = list(), list()
        np.random.seed(seed)
        for _, group in data_grouped_by_user:
            n_items_u = len(group)
            if n_items_u >= 5:
                idx = np.zeros(n_items_u, dtype="bool")
                idx[np.random.choice(n_items_u, size=int(test_prop * n_items_u), replace=False).astype("int64")] = True
                tr_list.append(group[np.logical_not(idx)])
                te_list.append(group[idx])
            else:
                tr_list.append(group)
        return pd.concat(tr_list), pd.concat(te_list)

    vad_plays = raw.loc[raw["userId"].isin(vd_users)]
    vad_plays = vad_plays.loc[vad_plays["movieId"].isin(unique_sid)]
    vad_plays_tr, vad_plays_te = split_train_test_proportion(vad_plays)
    test_plays = raw.loc[raw["userId"].isin(te_users)]
    test_plays = test_plays.loc[test_plays["movieId"].isin(unique_sid)]
    test_plays_tr, test_plays_te = split_train_test_proportion(test_plays)
    return {"train": train_plays, "val_foldin": vad_plays_tr, "val": vad_plays_te, "test_foldin": test_plays_tr,
            "test": test_plays_te}


def test_held_out_users_are_split_as_vae_cfs_notebook_splits_them():
    rng = np.random.default_rng(7)
    rows = [(u, i) for u in range(1, 41) for i in rng.choice(30, size=rng.integers(3, 20), replace=False)]
    rng.shuffle(rows)  # the notebook keeps the data's order within a user: so must we
    raw = pd.DataFrame(rows, columns=["userId", "movieId"])
    expected = vae_cf_notebook(raw, n_heldout=6)
    users, items = np.unique(raw.userId, return_inverse=True)[1], np.unique(raw.movieId, return_inverse=True)[1]
    split = split_users(users, items, np.arange(len(raw)), n_users=40, heldout=6)
    for part, frame in expected.items():
        got = raw.iloc[getattr(split, part)]
        assert sorted(zip(got.userId, got.movieId)) == sorted(zip(frame.userId, frame.movieId)), part


def test_held_out_users_are_not_trained_on_and_given_their_fold_in_ratings():
    frame = shop(n_users=100)
    dm = module(frame, split="users", orientation="user", heldout_users=10)
    train_users = {u for u, _ in cells(dm, dm.train_matrix)}
    held = {u for u, _ in cells(dm, dm.test_matrix)} | {u for u, _ in cells(dm, dm.val_matrix)}
    assert not train_users & held and len({u for u, _ in cells(dm, dm.test_matrix)}) == 10
    foldin = cells(dm, dm.test_inputs) - cells(dm, dm.val_inputs) - cells(dm, dm.val_matrix)
    assert {u for u, _ in foldin} == {u for u, _ in cells(dm, dm.test_matrix)}  # each test user's own input
    assert not foldin & cells(dm, dm.test_matrix)
    with pytest.raises(DataError, match="data.split=users holds out whole users"):
        RatingsDataModule("table", columns=COLUMNS, split="users", orientation="item")


def test_the_temporal_splits_need_times():
    frame = shop().drop(columns="ts")
    with pytest.raises(DataError, match="data.split=temporal orders ratings by time, and DataFrame has none"):
        RatingsDataModule("table", columns=NO_TIME, split="temporal").use_frame(frame).setup()


def test_a_dataframe_round_trip_keeps_its_text_ids(tmp_path):
    frame = shop()
    cfg = cfae.compose("data=table", *(f"data.columns.{k}={v}" for k, v in COLUMNS.items()), "hidden=8",
                       "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "ranking.k=[5,10]",
                       f"logger.uri=sqlite:///{tmp_path}/mlflow.db", f"output_dir={tmp_path}/out")
    trained = cfae.fit(cfg, ratings=frame)
    assert {"test/mae", "test/recall_at_5", "test/ndcg_at_10"} <= set(trained.metrics)
    rec = cfae.load(trained.run_id, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    top = rec.recommend("c3", k=5)
    assert len(top) == 5 and all(isinstance(r.item_id, str) and r.item_id.startswith("p") for r in top)
    given = rec.item_ids[rec.user_ratings()[rec.user_index["c3"]].indices]  # its training and validation ratings
    assert len(given) and not set(given) & {r.item_id for r in top}


def test_a_saved_model_is_tested_on_another_split_and_another_file_as_a_run_of_its_own(tmp_path):
    from mlflow.tracking import MlflowClient

    frame, uri = shop(), f"sqlite:///{tmp_path}/mlflow.db"
    frame.to_csv(tmp_path / "shop.csv", index=False)
    cfg = cfae.compose("data=table", f"data.path={tmp_path / 'shop.csv'}", "data.orientation=user", "hidden=8",
                       *(f"data.columns.{k}={v}" for k, v in COLUMNS.items()), "trainer.max_epochs=2",
                       "trainer.enable_progress_bar=false", f"logger.uri={uri}", f"output_dir={tmp_path}/out")
    trained = cfae.fit(cfg)
    again = cfae.evaluate(trained.run_id, tracking_uri=uri)  # its own split: its own test RMSE
    assert again["test/rmse"] == pytest.approx(trained.metrics["test/rmse"], abs=1e-5)
    assert again["evaluate/not_scored"] == 0
    temporal = cfae.evaluate(trained.run_id, "data.split=temporal", tracking_uri=uri)
    logged = MlflowClient(uri).get_run(temporal["run_id"])
    assert logged.data.tags["cfae.model_run"] == trained.run_id == logged.data.tags["mlflow.parentRunId"]
    assert logged.data.metrics["test/rmse"] == pytest.approx(temporal["test/rmse"])
    assert logged.data.params["data/split"] == "temporal"
    # another file: new users are scored from their own ratings; an item the model never saw cannot be
    newcomers = shop(n_users=20, seed=5).assign(customer=lambda f: "new-" + f.customer)
    newcomers.loc[newcomers.index[:30], "product"] = "p-unseen"
    newcomers = newcomers.drop_duplicates(["customer", "product"])
    newcomers.to_csv(tmp_path / "new.csv", index=False)
    other = cfae.evaluate(tmp_path / "out", f"data.path={tmp_path / 'new.csv'}", "data.fold=1")
    assert other["evaluate/scored"] > 0 and other["evaluate/not_scored"] > 0 and "run_id" not in other
    assert 0.3 < other["test/rmse"] < 2.5
