import hashlib
import subprocess
import zipfile

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cfae.checks import DataError, UsageError
from cfae.data import RatingsDataModule, movielens
from cfae.data import module as data_module
from cfae.data.means import fallback_predictions
from cfae.data.module import ShuffledBatches
from cfae.data.movielens import locate_ratings, read_ratings
from cfae.data.ratings import Ratings, build_matrix
from cfae.data.splits import Split, split_ratings
from cfae.sparse import SparseRows
from cfae.synthetic import planted_ratings, write_ratings


def module(root, **kwargs) -> RatingsDataModule:
    dm = RatingsDataModule(dataset="ml1m", root=str(root), download=False, **kwargs)
    dm.setup()
    return dm


def as_pairs(m: sp.csr_matrix) -> set[tuple[int, int]]:
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist()))


# --- reading -----------------------------------------------------------------------------------------

def test_reads_both_formats_identically(tmp_path):
    ratings = planted_ratings(n_users=20, n_items=10, density=0.5)
    for sep in ("::", "\t"):
        got = read_ratings(write_ratings(tmp_path / f"r{len(sep)}", ratings, separator=sep), sep)
        np.testing.assert_array_equal(got.users, ratings.users)
        np.testing.assert_array_equal(got.items, ratings.items)
        np.testing.assert_array_equal(got.ratings, ratings.ratings)


@pytest.mark.parametrize("name", ["ml100k", "ml1m", "ml10m", "ml20m"])
def test_every_dataset_format_loads_through_the_data_module(tmp_path, name):
    spec = movielens.DATASETS[name]
    ratings = planted_ratings(n_users=40, n_items=30, density=0.5)
    if spec.rating_min == 0.5:  # half stars
        ratings = ratings._replace(ratings=ratings.ratings - 0.5 * (ratings.users % 2))
    header = "userId,movieId,rating,timestamp" if spec.header else None
    write_ratings(tmp_path / spec.dirname / spec.ratings_file, ratings, separator=spec.separator, header=header)
    dm = RatingsDataModule(dataset=name, root=str(tmp_path), download=False, min_item_ratings=1)
    dm.setup()
    assert dm.train_matrix.nnz + dm.val_matrix.nnz + dm.test_matrix.nnz == len(ratings.ratings)
    assert sorted(np.concatenate([m.data for m in (dm.train_matrix, dm.val_matrix, dm.test_matrix)])) == sorted(
        ratings.ratings)
    assert dm.rating_range == (spec.rating_min, 5.0)


def read_error(path, text: str, separator: str = "::", **kwargs) -> str:
    """The message read_ratings gives for a file holding `text`."""
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_ratings(path, separator, **kwargs)
    return str(err.value)


def test_csv_header_is_skipped_but_counted_in_line_numbers(tmp_path):
    path = tmp_path / "ratings.csv"
    got = read_error(path, "userId,movieId,rating,timestamp\n1,10,4.5,1\n1,11,5.5,2\n", ",", header=True,
                     rating_min=0.5)
    assert got == f"{path} line 3: rating 5.5 outside [0.5, 5]: '1,11,5.5,2'"


def test_header_line_counts_in_the_line_numbers_of_ratings(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n1,10,4.5,1\n")
    got = read_ratings(path, ",", header=True, rating_min=0.5)
    assert got.path == path and got.first_line == 2  # rating 0 is on line 2


LINES = "1::10::5::978300760\n1::11::4::978300761\n"


@pytest.mark.parametrize("text,message", [
    (LINES + "2::12::oops::978300762\n",
     "line 3: user and item must be integers and the rating a number: '2::12::oops::978300762'"),
    (LINES + "6040::1097::4",  # the last line lost its timestamp (and its newline)
     "line 3: expected 4 fields separated by '::', got 3: '6040::1097::4'"),
    (LINES + "6040::1097::4\n\n",
     "line 3: expected 4 fields separated by '::', got 3: '6040::1097::4'"),
    ("1::10::5::978300760\n1::11\n", "line 2: expected 4 fields separated by '::', got 2: '1::11'"),
    ("1::10::5::1\n1::11::6::2\n", "line 2: rating 6 outside [1, 5]: '1::11::6::2'"),
    ("1::10::5::1\n1::11::nan::2\n", "line 2: rating nan outside [1, 5]: '1::11::nan::2'"),
    (LINES + "\n2::12::3::978300762\n", "line 3 is blank (only blank lines at the end of the file are ignored)"),
    ("\n" + LINES, "line 1 is blank (only blank lines at the end of the file are ignored)"),
    # a bad first line is blamed, not the good lines that follow it
    ("1::10::5\n" + LINES, "line 1: expected 4 fields separated by '::', got 3: '1::10::5'"),
    ("1::10::5::1::x\n2::10::5::1::x\n", "line 1: expected 3 or 4 fields separated by '::', got 5: '1::10::5::1::x'"),
    ("1::10::5::1\n2::10::5::1::9\n", "line 2: expected 4 fields separated by '::', got 5: '2::10::5::1::9'"),
    (LINES + "2::12::3::9783007622::13::4::978300763\n",  # a lost newline joins two lines
     "line 3: expected 4 fields separated by '::', got 7: '2::12::3::9783007622::13::4::978300763'"),
    ("1::10::5::1\n99999999999999999999::11::4::2\n",
     "line 2: user or item id out of the 64-bit integer range: '99999999999999999999::11::4::2'"),
    ("1::10::5::1\n1::1.5::4::2\n", "line 2: user and item must be integers and the rating a number: '1::1.5::4::2'"),
])
def test_every_malformed_line_is_named_with_its_number_and_text(tmp_path, text, message):
    path = tmp_path / "ratings.dat"
    assert read_error(path, text) == f"{path} {message}"


@pytest.mark.parametrize("text", ["", "\n", "\n\n  \n", " \t\r\n"])
def test_an_empty_file_says_so(tmp_path, text):
    path = tmp_path / "ratings.dat"
    assert read_error(path, text) == f"{path}: the file is empty (no ratings)"


def test_a_header_without_ratings_says_so(tmp_path):
    path = tmp_path / "ratings.csv"
    assert read_error(path, "userId,movieId,rating,timestamp\n\n", ",", header=True) == (
        f"{path}: no ratings below the header line")


@pytest.mark.parametrize("tail", ["", "\n", "\n\n\n", "\n  \n\t\n", "\r\n\r\n"])
def test_blank_lines_at_the_end_are_ignored(tmp_path, tail):
    path = tmp_path / "ratings.dat"
    path.write_text("1::10::5::1\r\n2::10::3::2\r\n2::11::4::3" + tail)
    got = read_ratings(path, "::")
    assert got.users.tolist() == [1, 2, 2] and got.items.tolist() == [10, 10, 11]
    assert got.ratings.tolist() == [5, 3, 4]


def test_an_unreadable_path_is_a_data_error_without_a_chained_cause(tmp_path):
    with pytest.raises(DataError) as err:
        read_ratings(tmp_path, "::")  # a folder
    assert str(err.value).startswith(f"{tmp_path}: cannot read the ratings file (")
    assert err.value.__cause__ is None and err.value.__suppress_context__


# the example from the message's specification: line 7 repeats line 2; line 8 repeats line 1, but later
REPEATS = "1::10::5::1\n3::12::4::2\n2::10::3::3\n3::13::4::4\n1::12::2::5\n4::12::5::6\n3::12::1::7\n1::10::4::8\n"


def test_a_repeated_pair_names_both_lines_and_the_pair_in_the_files_ids(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text(REPEATS)
    with pytest.raises(DataError) as err:
        build_matrix(read_ratings(path, "::"), min_item_ratings=1)
    assert str(err.value) == f"{path} line 7: user 3, item 12 is rated again (first on line 2)"


def test_a_repeated_pair_counts_the_header_line(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n" + REPEATS.replace("::", ","))
    with pytest.raises(DataError, match=r"line 8: user 3, item 12 is rated again \(first on line 3\)$"):
        build_matrix(read_ratings(path, ",", header=True), min_item_ratings=1)


def test_a_repeated_pair_fails_the_data_module_setup_with_the_line(tmp_path):
    path = tmp_path / "ml-1m" / "ratings.dat"
    path.parent.mkdir()
    path.write_text(REPEATS)
    dm = RatingsDataModule(root=str(tmp_path), download=False, min_item_ratings=1)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert str(err.value) == f"{path} line 7: user 3, item 12 is rated again (first on line 2)"


def test_a_repeated_pair_in_memory_names_the_positions():
    ratings = Ratings(np.array([1, 2, 1]), np.array([5, 5, 5]), np.array([3.0, 4.0, 2.0], dtype=np.float32))
    with pytest.raises(DataError) as err:
        build_matrix(ratings, 1, source="synthetic")
    assert str(err.value) == "synthetic: user 1, item 5 is rated again (rating 3, first as rating 1)"


def test_repeated_pair_is_found_as_the_earliest_repeat_among_many():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 500), rng.integers(0, 30, 500)
    seen, want = {}, None
    for position, pair in enumerate(zip(users.tolist(), items.tolist())):
        if pair in seen:
            want = (position + 1, seen[pair] + 1)
            break
        seen[pair] = position
    with pytest.raises(DataError) as err:
        build_matrix(Ratings(users, items, np.ones(500, dtype=np.float32)), 1)
    assert str(err.value).endswith(f"(rating {want[0]}, first as rating {want[1]})")


# --- locating and downloading ------------------------------------------------------------------------

def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'ml2m'.*ml100k, ml10m, ml1m, ml20m"):
        RatingsDataModule(dataset="ml2m")


def test_missing_files_offline_say_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/ml-1m/ratings.dat not found.*Offline\? Put ratings.dat"):
        locate_ratings("ml1m", tmp_path)  # download allowed, but the network is unreachable
    assert list(tmp_path.iterdir()) == []  # no partial files


@pytest.mark.parametrize("missing", ["ratings.dat", "ml-1m"])
def test_a_missing_ratings_file_without_download_is_one_clean_line(tmp_path, capsys, missing):
    if missing == "ratings.dat":
        (tmp_path / "ml-1m").mkdir()  # the dataset folder without its ratings file
    dm = RatingsDataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    assert str(err.value) == (f"{tmp_path}/ml-1m/ratings.dat not found and data.download=false: put ratings.dat "
                              f"from {movielens.GROUPLENS}/ml-1m.zip in {tmp_path}/ml-1m/, or set data.download=true")
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert capsys.readouterr() == ("", "")  # nothing printed before the error


def test_a_failed_download_carries_its_cause_in_the_message_not_a_chained_traceback(tmp_path):
    with pytest.raises(DataError) as err:
        locate_ratings("ml1m", tmp_path)
    assert "tests are offline" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.parametrize("via", ["argument", "CFAE_DATA_DIR"])
def test_a_named_data_root_that_does_not_exist_is_an_error_not_created(tmp_path, monkeypatch, via):
    root = tmp_path / "x" / "y"
    monkeypatch.delenv("CFAE_DATA_DIR", raising=False)
    if via == "CFAE_DATA_DIR":
        monkeypatch.setenv("CFAE_DATA_DIR", str(root))
    with pytest.raises(DataError) as err:
        locate_ratings("ml1m", root if via == "argument" else None)
    assert str(err.value) == f"data root {root} does not exist (CFAE_DATA_DIR or data.root)"
    assert not (tmp_path / "x").exists()


def test_a_data_root_that_is_a_file_is_an_error(tmp_path):
    root = tmp_path / "data"
    root.write_text("")
    with pytest.raises(DataError, match=rf"^data root {root} is not a folder \(CFAE_DATA_DIR or data.root\)$"):
        locate_ratings("ml1m", root, download=False)


def test_the_default_cache_is_created_for_a_download(tmp_path, monkeypatch):
    fake_archive(tmp_path, monkeypatch)
    monkeypatch.delenv("CFAE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # does not exist yet
    assert locate_ratings("ml1m") == tmp_path / "cache" / "cfae" / "ml-1m" / "ratings.dat"


def fake_archive(tmp_path, monkeypatch, md5: str | None = None):
    """Point ml1m at a local zip (file://) so the download path runs without a network."""
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::1::5::0\n2::1::3::0\n")
    real = movielens.DATASETS["ml1m"]
    digest = md5 or hashlib.md5(archive.read_bytes()).hexdigest()
    spec = movielens.DatasetSpec(real.dirname, real.ratings_file, real.separator, archive.as_uri(), digest)
    monkeypatch.setitem(movielens.DATASETS, "ml1m", spec)


def test_download_verifies_and_unpacks(tmp_path, monkeypatch):
    fake_archive(tmp_path, monkeypatch)
    root = tmp_path / "cache"
    root.mkdir()
    path = locate_ratings("ml1m", root)
    assert path == root / "ml-1m" / "ratings.dat" and path.read_text().startswith("1::1::5")
    assert [p.name for p in root.iterdir()] == ["ml-1m"]  # the temporary folder is gone


def test_checksum_mismatch_leaves_no_partial_files(tmp_path, monkeypatch):
    fake_archive(tmp_path, monkeypatch, md5="0" * 32)
    root = tmp_path / "cache"
    root.mkdir()
    with pytest.raises(DataError, match="checksum mismatch.*expected 0000"):
        locate_ratings("ml1m", root)
    assert list(root.iterdir()) == []


# --- preprocessing -----------------------------------------------------------------------------------

def test_filter_drops_items_below_threshold_and_reindexes():
    # item 7 has 3 ratings, item 8 has 2, item 9 has 1; user 3 rates only item 9
    users = np.array([1, 2, 4, 1, 2, 3])
    items = np.array([7, 7, 7, 8, 8, 9])
    rm = build_matrix(Ratings(users, items, np.full(6, 4.0, dtype=np.float32)), min_item_ratings=2)
    assert rm.stats["n_items"] == 2 and rm.dropped_items == 1 and rm.dropped_ratings == 1
    assert rm.stats["n_users"] == 3  # user 3 lost its only rating
    np.testing.assert_array_equal(rm.user_ids, [1, 2, 4])
    np.testing.assert_array_equal(rm.item_ids, [7, 8])
    assert rm.matrix.toarray().tolist() == [[4, 4], [4, 4], [4, 0]]


def test_filtering_that_leaves_nothing_says_so_at_once(data_root):
    most = np.bincount(planted_ratings().items).max()
    dm = RatingsDataModule(root=str(data_root), download=False, min_item_ratings=100000)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert str(err.value) == (f"{data_root}/ml-1m/ratings.dat: no ratings left after dropping items with fewer "
                              f"than 100000 ratings (data.min_item_ratings); the most-rated item has {most}")


def test_too_few_ratings_to_split_names_the_counts(tmp_path):
    path = tmp_path / "ml-1m" / "ratings.dat"
    path.parent.mkdir()
    path.write_text("1::10::5::1\n2::10::3::2\n3::10::4::3\n")
    dm = RatingsDataModule(root=str(tmp_path), download=False, min_item_ratings=1)
    with pytest.raises(DataError) as err:
        dm.setup()
    # 3 ratings: round(0.2 * 3) = 1 test, round(0.05 * 2) = 0 validation
    assert str(err.value) == (f"{path}: 3 ratings are too few for data.split=random (data.test_fraction=0.2, "
                              f"data.val_fraction=0.05): train 2, validation 0, test 1")


# --- splits ------------------------------------------------------------------------------------------

def test_split_is_disjoint_exhaustive_deterministic_and_sized():
    n = 10_001
    s = split_ratings(n, fold=2)
    all_idx = np.concatenate([s.train, s.val, s.test])
    assert len(all_idx) == n and len(np.unique(all_idx)) == n  # disjoint and exhaustive
    assert len(s.test) == round(0.2 * n) and len(s.val) == round(0.05 * (n - len(s.test)))
    again = split_ratings(n, fold=2)
    assert all(np.array_equal(a, b) for a, b in zip(s, again))
    assert not np.array_equal(s.test, split_ratings(n, fold=3).test)  # folds are different draws
    assert not np.array_equal(s.test, split_ratings(n, fold=2, seed=1).test)


@pytest.mark.parametrize(("fold", "message"), [(-1, "data.fold=-1: must be an integer >= 0"),
                                               (5, r"data.fold=5: must be an integer from 0 to 4 \(data.n_folds=5\)")])
def test_fold_outside_range(fold, message):
    with pytest.raises(UsageError, match=message):
        RatingsDataModule(fold=fold)


@pytest.mark.parametrize("key,value,message", [
    ("val_fraction", 0, "data.val_fraction=0: must be a number > 0 and < 1"),
    ("val_fraction", 1.0, "data.val_fraction=1.0: must be a number > 0 and < 1"),
    ("test_fraction", 0, "data.test_fraction=0: must be a number > 0 and < 1"),
    ("test_fraction", -0.2, "data.test_fraction=-0.2: must be a number > 0 and < 1"),
    ("batch_size", 0, "data.batch_size=0: must be an integer >= 1"),
    ("batch_size", 2.5, "data.batch_size=2.5: must be an integer >= 1"),
    ("eval_batch_size", -1, "data.eval_batch_size=-1: must be an integer >= 1"),
    ("orientation", "rows", "data.orientation=rows: must be item or user"),
])
def test_settings_are_refused_when_the_module_is_made_and_up_front_alike(key, value, message):
    from cfae.checks import check_config
    from cfae.configs import compose

    with pytest.raises(UsageError) as built:
        RatingsDataModule(**{key: value})
    with pytest.raises(UsageError) as up_front:
        check_config(compose(f"data.{key}={value}"))
    assert str(built.value) == str(up_front.value) == message


@pytest.mark.parametrize("orientation", ["item", "user"])
def test_no_held_out_rating_inside_an_input(data_root, orientation):
    dm = module(data_root, orientation=orientation)
    train, val, test = as_pairs(dm.train_matrix), as_pairs(dm.val_matrix), as_pairs(dm.test_matrix)
    assert not (train & val) and not (train & test) and not (val & test)
    total = planted_ratings()
    assert len(train) + len(val) + len(test) == len(total.ratings)
    val_batches = eval_batches(dm.val_dataloader(), dm.val_matrix)
    test_batches = eval_batches(dm.test_dataloader(), dm.test_matrix)
    val_inputs = set().union(*(pairs_of(b.inputs, rows) for b, rows in val_batches))
    test_inputs = set().union(*(pairs_of(b.inputs, rows) for b, rows in test_batches))
    assert val_inputs <= train and not (val_inputs & val)
    assert test_inputs <= train | val and not (test_inputs & test)


def eval_batches(loader, targets):
    rows = np.flatnonzero(np.diff(targets.indptr))
    start = 0
    for batch in loader:
        yield batch, rows[start:start + batch.inputs.n_rows]
        start += batch.inputs.n_rows
    assert start == len(rows)  # every row with a held-out rating is evaluated


def pairs_of(rows_batch: SparseRows, rows) -> set[tuple[int, int]]:
    assert rows_batch.rows.tolist() == rows.tolist()
    r = rows[rows_batch.row_index().numpy()]
    return set(zip(r.tolist(), rows_batch.col.tolist()))


def test_orientation_transposes(data_root):
    item, user = module(data_root, orientation="item"), module(data_root, orientation="user")
    assert (item.train_matrix != user.train_matrix.T).nnz == 0
    assert item.n_cols == 300 and user.n_cols == 200


def test_every_training_row_is_served_once_per_epoch(data_root):
    dm = module(data_root, batch_size=64)  # 200 item rows: batches of 64, 64, 64 and 8
    batches = list(dm.train_dataloader())
    assert [b.n_rows for b in batches] == [64, 64, 64, 8]
    assert sum(len(b.val) for b in batches) == dm.train_matrix.nnz
    assert sorted(np.concatenate([b.val.numpy() for b in batches])) == sorted(dm.train_matrix.data)
    assert sorted(np.concatenate([b.rows.numpy() for b in batches])) == list(range(200))


def test_take_cuts_the_same_rows_as_slicing_the_csr_matrix_empty_rows_included():
    m = sp.random(30, 11, density=0.2, format="csr", random_state=1, dtype=np.float32)
    m[4] = 0  # an empty row
    m.eliminate_zeros()
    whole = SparseRows.from_csr(m, np.arange(30))
    for rows in ([4], [29, 4, 0, 17], list(range(30)), []):
        got, want = whole.take(torch.tensor(rows, dtype=torch.int64)), SparseRows.from_csr(m, np.array(rows, dtype=int))
        for a, b in zip(got[:4], want[:4]):
            assert torch.equal(a, b)


def test_batches_held_on_the_device_train_exactly_like_batches_sliced_on_the_host(data_root):
    import lightning as L

    from cfae.models import AutoRec

    class Recorder(L.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert isinstance(batch, SparseRows)
            self.batches.append(batch)

    weights = {}
    for on_device in (False, True):
        dm = module(data_root, batch_size=48, batches_on_device=on_device)
        torch.manual_seed(0)
        model, recorder = AutoRec(n_inputs=dm.n_cols, hidden_size=8, optimizer=torch.optim.Adam), Recorder()
        trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[recorder], accelerator="cpu")
        trainer.fit(model, datamodule=dm)
        assert isinstance(next(iter(dm.train_dataloader())), torch.Tensor) == on_device  # row numbers only
        assert sum(len(b.val) for b in recorder.batches) == 2 * dm.train_matrix.nnz
        weights[on_device] = model.encoder.weight.detach().clone()
    torch.testing.assert_close(weights[True], weights[False], rtol=0, atol=0)


def test_host_batches_from_worker_processes_are_the_batches_of_the_main_process(data_root):
    in_main = list(module(data_root, batch_size=48).train_dataloader())
    from_workers = list(module(data_root, batch_size=48, num_workers=2).train_dataloader())
    assert len(in_main) == len(from_workers) == 5
    for a, b in zip(in_main, from_workers):
        assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4]))


def test_batches_on_device_setting_is_checked_and_auto_slices_on_the_host_for_a_cpu(data_root):
    with pytest.raises(DataError, match="batches_on_device='gpu'"):
        RatingsDataModule(batches_on_device="gpu")
    assert not module(data_root).holds_batches_on_device(torch.device("cpu"))


@pytest.mark.parametrize("n_rows,sizes", [(9, [4, 5]), (10, [4, 4, 2]), (1, [1]), (4, [4])])
def test_batches_cover_every_row_once_and_never_leave_a_single_row_alone(n_rows, sizes):
    sampler = ShuffledBatches(n_rows, 4, torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert [len(b) for b in batches] == sizes and len(sampler) == len(sizes)
    assert sorted(sum(batches, [])) == list(range(n_rows))


def test_a_data_module_over_ratings_in_memory_splits_like_one_over_a_file(data_root):
    from_file = module(data_root)
    in_memory = RatingsDataModule.from_ratings(planted_ratings(), root=str(data_root / "nowhere"))
    in_memory.prepare_data()  # needs no files
    in_memory.setup()
    assert (from_file.test_matrix != in_memory.test_matrix).nnz == 0
    assert (from_file.train_matrix != in_memory.train_matrix).nnz == 0


def test_planted_ratings_at_a_huge_shape_are_unique_cells():
    r = planted_ratings(n_users=138_493, n_items=26_744, density=2e-5, seed=1)  # 3.7e9 cells, 74k ratings
    assert len(r.ratings) == int(2e-5 * 138_493 * 26_744)
    assert len(np.unique(r.users * 26_744 + r.items)) == len(r.ratings)


def test_sparse_rows_densify_to_the_csr_matrix():
    m = sp.random(5, 7, density=0.3, format="csr", random_state=0, dtype=np.float32)
    rows = SparseRows.from_csr(m, np.arange(5))
    np.testing.assert_array_equal(rows.to_dense().numpy(), m.toarray())
    assert rows.row_index().tolist() == m.tocoo().row.tolist()


def test_fallback_only_where_a_row_or_column_has_no_input():
    inputs = sp.csr_matrix(np.array([[4, 0, 2], [0, 0, 0], [5, 0, 3]], dtype=np.float32))
    targets = sp.csr_matrix(np.array([[0, 3, 1], [2, 0, 0], [4, 0, 0]], dtype=np.float32))
    # held-out, in CSR order: (0,1) column 1 empty -> row 0 mean 3; (0,2) both known -> model;
    # (1,0) row 1 empty -> column 0 mean 4.5; (2,0) both known -> model
    got = fallback_predictions(inputs, targets)
    np.testing.assert_array_equal(np.isnan(got), [False, True, False, True])
    assert got[0] == 3 and got[2] == 4.5
    both_empty = fallback_predictions(sp.csr_matrix(np.array([[2, 0], [0, 0]], dtype=np.float32)),
                                      sp.csr_matrix(np.array([[0, 0], [0, 5]], dtype=np.float32)))
    assert both_empty.tolist() == [2.0]  # the global mean when row and column are both empty


def test_eval_batch_carries_fallbacks_aligned_with_targets(data_root):
    dm = module(data_root)
    batches = list(dm.test_dataloader())
    assert sum(len(b.fallback) for b in batches) == dm.test_matrix.nnz
    assert all(len(b.fallback) == len(b.targets.val) for b in batches)
    assert all(torch.isnan(b.fallback).all() for b in batches)  # dense synthetic data needs none


def test_baseline_rmse_predicts_the_training_mean_for_the_validation_ratings(tmp_path, monkeypatch):
    # one movie rated by users 1..6, split by hand: users 1-3 train, 4-5 validation, 6 test
    path = tmp_path / "ml-1m" / "ratings.dat"
    path.parent.mkdir()
    path.write_text("".join(f"{user}::7::{rating}::0\n" for user, rating in enumerate([1, 2, 3, 5, 4, 1], 1)))
    by_hand = Split(train=np.array([0, 1, 2]), val=np.array([3, 4]), test=np.array([5]))
    monkeypatch.setattr(data_module, "split_ratings", lambda *args, **kwargs: by_hand)
    dm = module(tmp_path, min_item_ratings=1, orientation="user")
    # training mean (1 + 2 + 3) / 3 = 2; validation errors 5 - 2 = 3 and 4 - 2 = 2
    assert dm.baseline_rmse == pytest.approx(np.sqrt((3**2 + 2**2) / 2))


MKU_SH = r"""for i in 1 2 3 4 5
do
	head -`expr $i \* 20000` u.data | tail -20000 > tmp.$$
	sort -t"	" -k 1,1n -k 2,2n tmp.$$ > u$i.test
	head -`expr \( $i - 1 \) \* 20000` u.data > tmp.$$
	tail -`expr \( 5 - $i \) \* 20000` u.data >> tmp.$$
	sort -t"	" -k 1,1n -k 2,2n tmp.$$ > u$i.base
done
rm -f tmp.$$
"""  # the split part of GroupLens's ml-100k/mku.sh, verbatim


@pytest.fixture(scope="module")
def u_data(tmp_path_factory):
    """A synthetic ml-100k/u.data of 100,000 ratings in a random line order, and mku.sh's files cut from it."""
    folder = tmp_path_factory.mktemp("u") / "ml-100k"
    folder.mkdir()
    rng = np.random.default_rng(3)
    cells = rng.choice(900 * 400, size=100_000, replace=False)
    lines = [f"{c // 400 + 1}\t{c % 400 + 1}\t{rng.integers(1, 6)}\t{880000000 + k}\n" for k, c in enumerate(cells)]
    (folder / "u.data").write_text("".join(lines))
    recipe = tmp_path_factory.mktemp("mku")
    (recipe / "u.data").write_text("".join(lines))
    subprocess.run(["sh", "-c", MKU_SH], cwd=recipe, check=True)
    return folder, recipe


def triples(dm, matrix) -> set[tuple[int, int, float]]:
    m = matrix.tocoo() if dm.orientation == "user" else matrix.T.tocoo()
    return set(zip(dm.user_ids[m.row].tolist(), dm.item_ids[m.col].tolist(), m.data.tolist()))


@pytest.mark.parametrize("split", ["u1", "u4"])
@pytest.mark.parametrize("orientation", ["user", "item"])
def test_grouplens_splits_hold_out_the_lines_mku_sh_cuts(u_data, split, orientation):
    folder, recipe = u_data
    dm = RatingsDataModule("ml100k", root=str(folder.parent), download=False, split=split, min_item_ratings=0,
                             orientation=orientation)
    dm.setup()
    expected = read_ratings(recipe / f"{split}.test", "\t")
    base = read_ratings(recipe / f"{split}.base", "\t")
    assert triples(dm, dm.test_matrix) == set(zip(expected.users.tolist(), expected.items.tolist(),
                                                  expected.ratings.tolist()))
    train, val = triples(dm, dm.train_matrix), triples(dm, dm.val_matrix)
    assert train | val == set(zip(base.users.tolist(), base.items.tolist(), base.ratings.tolist()))  # from base only
    assert not train & val and len(val) == round(0.05 * 80_000)


def test_the_releases_own_split_file_is_checked_against_u_data(u_data, tmp_path):
    folder, recipe = u_data
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_bytes((folder / "u.data").read_bytes())
    (tmp_path / "ml-100k" / "u1.test").write_bytes((recipe / "u1.test").read_bytes())
    dm = RatingsDataModule("ml100k", root=str(tmp_path), download=False, split="u1", min_item_ratings=0)
    dm.setup()  # the release's file agrees
    lines = (recipe / "u1.test").read_text().splitlines(keepends=True)
    (tmp_path / "ml-100k" / "u1.test").write_text("".join(lines[1:]))  # one rating missing
    with pytest.raises(DataError, match=r"u1.test: not the split mku.sh cuts from .*u.data \(1 ratings differ"):
        RatingsDataModule("ml100k", root=str(tmp_path), download=False, split="u1", min_item_ratings=0).setup()


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "ml1m", "split": "u1", "min_item_ratings": 0}, "GroupLens's ML-100K splits; data.dataset is ml1m"),
    ({"dataset": "ml100k", "split": "u1"}, r"data.min_item_ratings=10 would drop some of its test part"),
    ({"dataset": "ml100k", "split": "u9", "min_item_ratings": 0}, "data.split=u9: must be one of random, u1, u2"),
])
def test_bad_grouplens_split_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(UsageError, match=message):
        RatingsDataModule(download=False, **kwargs)


def test_a_grouplens_split_of_a_file_that_is_not_ml100k_is_refused(tmp_path):
    write_ratings(tmp_path / "ml-100k" / "u.data", planted_ratings(n_users=50, n_items=40, density=0.3), separator="\t")
    dm = RatingsDataModule("ml100k", root=str(tmp_path), download=False, split="u1", min_item_ratings=0)
    with pytest.raises(DataError, match=r"u.data: data.split=u1 is GroupLens's split of ML-100K's 100000 ratings; "
                                        r"this file has 600"):
        dm.setup()
