"""The LightningDataModule: ratings (a MovieLens release, a table of your own, or ratings in memory) split
into training, validation and test parts, served as batches of sparse rows."""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Annotated

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from cfae.checks import (
    ConfigError,
    Count,
    DataError,
    OpenFraction,
    PositiveInt,
    check_arguments,
    one_of,
)
from cfae.data.means import fallback_predictions
from cfae.data.movielens import dataset_spec, file_digest, locate_ratings, read_ratings, read_titles
from cfae.data.ratings import Ratings, build_matrix
from cfae.data.splits import (
    GROUPLENS_SPLITS,
    VAE_CF_SEED,
    Split,
    grouplens_test_lines,
    split_fixed_test,
    split_leave_last,
    split_ratings,
    split_temporal,
    split_users,
)
from cfae.data.tables import from_frame, read_table
from cfae.sparse import EvalBatch, SparseRows

log = logging.getLogger(__name__)



class ShuffledBatches(torch.utils.data.Sampler[list[int]]):
    """Row numbers in a fresh random order each epoch, cut into batches; every row is served once (`rows`:
    these row numbers only). A last batch of a single row joins the one before it (batch normalisation cannot
    train on one row)."""

    def __init__(self, n_rows: int, batch_size: int, generator: torch.Generator, rows: np.ndarray | None = None):
        self.n_rows, self.batch_size, self.generator = n_rows, batch_size, generator
        self.rows = None if rows is None else torch.as_tensor(rows)
        if self.rows is not None:
            self.n_rows = len(self.rows)

    def __iter__(self):  # a generator: the order is drawn at the first batch, not when iter() is called, so
        # an iterator made and dropped unused (DataLoader's worker set-up does so) takes no draw of its own
        order = torch.randperm(self.n_rows, generator=self.generator)
        batches = list((order if self.rows is None else self.rows[order]).split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2:] = [torch.cat(batches[-2:])]
        for b in batches:
            yield b.tolist()

    def __len__(self) -> int:
        full, tail = divmod(self.n_rows, self.batch_size)
        return full + (tail > 1) if full else int(tail > 0)


class _RowBatches(torch.utils.data.Dataset):
    """Indexed by a list of row numbers (from ShuffledBatches): one vectorised CSR slice per batch."""

    def __init__(self, matrix: sp.csr_matrix):
        self.matrix = matrix

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, rows: list[int]) -> SparseRows:
        return SparseRows.from_csr(self.matrix, np.asarray(rows))


class _RowNumbers(torch.utils.data.Dataset):
    """Indexed by a list of row numbers: the numbers themselves, as a tensor the trainer moves to the device."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64)



def check_split_file(path: Path, ratings: Ratings, is_test_line: np.ndarray) -> None:
    """The release's own u<k>.test, where present, must hold exactly the ratings derived from u.data."""
    if not path.exists():
        return
    given = read_ratings(path, "\t")
    derived = {(u, i, r) for u, i, r in zip(ratings.users[is_test_line].tolist(), ratings.items[is_test_line].tolist(),
                                            ratings.ratings[is_test_line].tolist())}
    found = set(zip(given.users.tolist(), given.items.tolist(), given.ratings.tolist()))
    if found != derived:
        odd = sorted(found - derived) or sorted(derived - found)
        raise DataError(f"{path}: not the split mku.sh cuts from {path.with_name('u.data')} "
                        f"({len(found ^ derived)} ratings differ, e.g. user {odd[0][0]}, item {odd[0][1]})")


SPLITS = ("random", *GROUPLENS_SPLITS, "temporal", "leave_last", "users")
TIMED = ("temporal", "leave_last")  # the splits that need each rating's time


class RatingsDataModule(L.LightningDataModule):
    """Ratings as sparse rows for autoencoders: a MovieLens release, a table of your own (`dataset="table"`:
    a CSV, TSV or Parquet file at `path`, or a DataFrame given to `cfae.fit`), or ratings in memory.

    `orientation="item"` makes each row an item's ratings by all users (I-AutoRec); `"user"` makes each
    row a user's ratings of all items (U-AutoRec, the study's choice). Validation feeds each row its input
    ratings (the training part, and a held-out user's fold-in part) and scores its validation ratings; the
    test feeds everything but the test part and scores the test ratings, which choose nothing.
    """

    def __init__(
        self,
        dataset: str = "ml1m",  # a MovieLens release (ml100k, ml1m, ml10m, ml20m), or "table"
        path: str | None = None,  # the table's file (dataset="table")
        columns: dict | None = None,  # {user, item, rating[, timestamp]}: the table's column for each
        sep: str | None = None,  # a CSV's separator; None: the one its header uses
        scale: list[float] | None = None,  # [min, max] of the ratings; None: the release's, or the table's own
        clicks_above: float | None = None,  # task=ranking: ratings above it are clicks (1), the others dropped
        root: str | None = None,  # None: $CFAE_DATA_DIR, else the user cache
        download: bool = True,
        min_item_ratings: Count = 10,  # the study, sec. 4.1
        min_user_ratings: Count = 0,
        orientation: Annotated[str, one_of("item", "user")] = "item",
        split: Annotated[str, one_of(*SPLITS)] = "random",  # see cfae/data/splits.py
        fold: Count = 0,
        n_folds: PositiveInt = 5,
        test_fraction: OpenFraction = 0.2,
        val_fraction: OpenFraction = 0.05,  # validation drives early stopping and model selection
        leave_last: PositiveInt = 1,  # split=leave_last: each user's last n ratings in time are the test part
        heldout_users: float = 0.1,  # split=users: held-out users per part, a count or a fraction of the users
        scored_fraction: OpenFraction = 0.2,  # split=users: the share of a held-out user's ratings that is scored
        seed: Count = 0,
        batch_size: PositiveInt = 256,
        eval_batch_size: PositiveInt = 1024,
        batches_on_device: str | bool = "auto",  # see train_dataloader
        num_workers: Count = 0,  # for batches sliced on the host
    ):
        check_arguments(type(self), {k: v for k, v in locals().items() if k != "self"}, "data.")  # cfae.checks
        super().__init__()
        self.spec = None if dataset == "table" else dataset_spec(dataset)
        if dataset == "table" and columns is None:
            raise DataError("data=table needs data.columns.user, data.columns.item and data.columns.rating")
        if fold >= n_folds:
            raise ConfigError(f"data.fold={fold}: must be an integer from 0 to {n_folds - 1} (data.n_folds={n_folds})")
        if split in GROUPLENS_SPLITS:
            if dataset != "ml100k":
                raise DataError(f"data.split={split} is one of GroupLens's ML-100K splits; data.dataset is {dataset}")
            if min_item_ratings > 1:
                raise DataError(f"data.split={split} holds every rating of u.data; data.min_item_ratings="
                                f"{min_item_ratings} would drop some of its test part (set it to 0, as "
                                "data=ml100k_u1 does)")
        if split in (*GROUPLENS_SPLITS, *TIMED) and fold != 0:
            raise DataError(f"data.fold={fold}: data.split={split} is one split, not folds (data.fold=0)")
        if split == "users" and orientation != "user":
            raise DataError("data.split=users holds out whole users, whom only user rows can take as input: set "
                            "data.orientation=user")
        self.dataset, self.root, self.download = dataset, root, download
        self.path, self.columns, self.sep = path, dict(columns or {}), sep
        self.scale = tuple(scale) if scale is not None else None
        self.clicks_above = clicks_above
        self.min_item_ratings, self.min_user_ratings, self.orientation = min_item_ratings, min_user_ratings, orientation
        self.split, self.fold, self.n_folds = split, fold, n_folds
        self.test_fraction, self.val_fraction = test_fraction, val_fraction
        self.leave_last, self.heldout_users, self.scored_fraction = leave_last, heldout_users, scored_fraction
        self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size
        if batches_on_device not in ("auto", True, False):
            raise DataError(f"data.batches_on_device={batches_on_device!r}: expected auto, true or false")
        self.batches_on_device, self.num_workers = batches_on_device, num_workers
        self._held: SparseRows | None = None  # the training matrix, on the device that cuts batches from it
        self.given: tuple[Ratings, str] | None = None  # (ratings, name) for a module over ratings in memory
        self.prepared = False

    def prepare_data(self) -> None:
        if self.given is None and self.spec is not None:  # ratings in memory or in a table need no download
            locate_ratings(self.dataset, self.root, self.download)

    @classmethod
    def from_ratings(cls, ratings: Ratings, name: str = "in-memory", **kwargs) -> RatingsDataModule:
        """A DataModule over ratings already in memory (synthetic benchmarks), split and batched the same way."""
        return cls(download=False, **kwargs).use_ratings(ratings, name)

    def use_ratings(self, ratings: Ratings, name: str) -> RatingsDataModule:
        """This module over `ratings` (in memory, named `name`) instead of a file; itself."""
        self.given, self.prepared = (ratings, name), False
        return self

    def use_frame(self, frame) -> RatingsDataModule:
        """This module over a pandas DataFrame's ratings, its columns named as a table's (`columns`); itself."""
        return self.use_ratings(from_frame(frame, self.columns, self.scale), "DataFrame")

    def read(self) -> tuple[Ratings, str, str]:
        """(ratings, where they came from, a checksum of them), and the titles where the data has them."""
        self.titles = {}
        if self.given is not None:
            ratings, source = self.given
            ids = [np.asarray(ratings.users), np.asarray(ratings.items)]
            named = [n for n in (ratings.user_names, ratings.item_names) if n is not None]
            digest = hashlib.sha256(b"".join(a.tobytes() for a in (*ids, *named, ratings.ratings)))
            return ratings, source, digest.hexdigest()
        if self.spec is None:  # a table of the user's own
            if not self.path:
                raise DataError("data=table needs data.path: the CSV, TSV or Parquet file of the ratings")
            ratings = read_table(self.path, self.columns, self.sep, self.scale)
            return ratings, str(self.path), file_digest(Path(self.path))
        path = locate_ratings(self.dataset, self.root, self.download)
        spec = self.spec
        low, high = self.scale or (spec.rating_min, spec.rating_max)
        ratings = read_ratings(path, spec.separator, spec.header, low, high, spec.rating_step)
        self.titles = read_titles(path, spec)  # movie id -> title, for recommendations
        return ratings, str(path), file_digest(path)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared:
            return
        ratings, source, checksum = self.read()
        if self.clicks_above is not None:  # vae_cf: ratings above 3.5 are clicks, before users are counted
            ratings = ratings.clicks(self.clicks_above)
        rm = build_matrix(ratings, self.min_item_ratings, source=source, min_user_ratings=self.min_user_ratings)
        if self.clicks_above is not None:
            low, high = 0.0, 1.0
        elif self.scale:
            low, high = self.scale
        elif self.spec:
            low, high = self.spec.rating_min, self.spec.rating_max
        else:  # a table's own lowest and highest rating
            low, high = float(rm.matrix.data.min()), float(rm.matrix.data.max())
        if not low < high:
            raise DataError(f"{source}: every rating is {low:g}; a scale needs two values (data.scale=[min,max])")
        self._rating_range = (low, high)
        self.user_ids, self.item_ids = rm.user_ids, rm.item_ids  # the original id of each user and item index
        self.stats = {**rm.stats, "sha256": checksum, "file": source}
        dropped = [f"{rm.stats['dropped_items']} items with < {self.min_item_ratings} ratings"] * (
            self.min_item_ratings > 1) + [f"{rm.stats['dropped_users']} users with < {self.min_user_ratings}"] * (
            self.min_user_ratings > 1)
        log.info("%s: %d users, %d items, %d ratings%s, sha256 %s", source, rm.stats["n_users"], rm.stats["n_items"],
                 rm.stats["n_ratings"], f" (dropped {' and '.join(dropped)}: {rm.stats['dropped_ratings']} ratings)"
                 if dropped else "", checksum[:12])

        m = rm.matrix.tocoo()  # users x items, in CSR order: m.data[i] is rm.positions[i]'s rating
        split = self.split_of(rm, m, ratings, source)
        item_col, n_items = m.col, m.shape[1]
        if self.split == "users":  # the items some training user rated; ratings of the others are in no part
            kept = np.unique(m.col[split.train])
            index = np.full(n_items, -1)
            index[kept] = np.arange(len(kept))
            item_col, n_items = index[m.col], len(kept)
            self.item_ids = self.item_ids[kept]
            self.stats.update(n_items=n_items, dropped_items_no_training_user_rated=m.shape[1] - n_items)
        rows, cols = (m.row, item_col) if self.orientation == "user" else (item_col, m.row)
        shape = (m.shape[0], n_items) if self.orientation == "user" else (n_items, m.shape[0])
        if not (len(split.train) and len(split.val) and len(split.test)):
            raise DataError(f"{source}: {m.nnz} ratings are too few for data.split={self.split} ("
                            f"data.test_fraction={self.test_fraction}, data.val_fraction={self.val_fraction}): "
                            f"train {len(split.train)}, validation {len(split.val)}, test {len(split.test)}")

        def part(*index_arrays: np.ndarray) -> sp.csr_matrix:
            i = np.concatenate(index_arrays)
            out = sp.csr_matrix((m.data[i], (rows[i], cols[i])), shape=shape)
            out.sort_indices()
            return out

        self.part = part
        self.parts = split
        self.train_matrix = part(split.train)  # (n_rows, n_cols): what the model trains on
        self.val_matrix = part(split.val)  # what validation scores
        self.test_matrix = part(split.test)  # what the test scores
        # what each is given as input: validation the training part (and held-out users' fold-in ratings);
        # the test everything but the test part
        self.val_inputs = part(split.train, split.val_foldin) if len(split.val_foldin) else self.train_matrix
        self.test_inputs = part(split.train, split.val, split.val_foldin, split.test_foldin)
        self.prepared = True

    def split_of(self, rm, m: sp.coo_matrix, ratings: Ratings, source: str) -> Split:
        """The split `self.split` of the matrix's ratings (indices in its CSR order)."""
        if self.split in TIMED and rm.timestamps is None:
            raise DataError(f"data.split={self.split} orders ratings by time, and {source} has none "
                            f"(data.columns.timestamp names a table's time column)")
        if self.split == "random":
            return split_ratings(m.nnz, self.fold, self.n_folds, self.test_fraction, self.val_fraction, self.seed)
        if self.split == "temporal":
            return split_temporal(rm.timestamps, self.test_fraction, self.val_fraction)
        if self.split == "leave_last":
            return split_leave_last(m.row, rm.timestamps, self.leave_last)
        if self.split == "users":
            return split_users(m.row, m.col, rm.positions, m.shape[0], self.heldout_users, self.scored_fraction,
                               VAE_CF_SEED + self.fold + 100 * self.seed)
        # GroupLens's u1..u5: the test lines of u.data
        is_test_line = grouplens_test_lines(len(ratings.ratings), self.split, source)
        check_split_file(Path(source).with_name(f"{self.split}.test"), ratings, is_test_line)
        return split_fixed_test(is_test_line[rm.positions], self.val_fraction, self.seed)

    def with_validation_in_training(self) -> RatingsDataModule:
        """A copy whose training part is the training and validation parts together, held-out users' fold-in
        ratings included (`refit=true`: a model trained anew once validation has chosen its epochs). Its
        validation loader scores ratings it trains on."""
        merged = copy.copy(self)
        merged.train_matrix = self.part(self.parts.train, self.parts.val, self.parts.val_foldin)
        merged.val_inputs, merged._held = merged.train_matrix, None
        return merged

    @property
    def baseline_rmse(self) -> float:
        """RMSE on the validation ratings of predicting the training part's mean rating: the reference any
        model should beat."""
        errors = self.val_matrix.data.astype(np.float64) - self.train_matrix.data.astype(np.float64).mean()
        return float(np.sqrt(np.mean(errors**2)))

    @property
    def n_cols(self) -> int:
        """Width of a row: the model's input and output size."""
        return self.train_matrix.shape[1]

    @property
    def n_rows(self) -> int:
        return self.train_matrix.shape[0]

    @property
    def rating_range(self) -> tuple[float, float]:
        """The rating scale: `data.scale`, else the release's, else the table's lowest and highest rating."""
        return self._rating_range

    def whole_matrix(self) -> bool:
        """Whether the attached model reads the whole matrix in one batch, rows in order (RatingModel)."""
        return self.trainer is not None and getattr(self.trainer.lightning_module, "whole_matrix", False)

    def device(self) -> torch.device:
        """Where training runs: the attached trainer's device, else the CPU."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def holds_batches_on_device(self, device: torch.device) -> bool:
        """Whether training batches are cut on the device from a copy of the training matrix kept there
        (`batches_on_device`): `auto` does so on a CUDA GPU whose free memory is four times the matrix
        (ML-1M: 9 MB; ML-20M: 0.2 GB), and slices on the host for the CPU, where scipy's row slicing is
        the faster of the two (6 against 11 ms per ML-1M epoch)."""
        if self.batches_on_device != "auto":
            return bool(self.batches_on_device)
        if device.type != "cuda":
            return False
        size = self.train_matrix.nnz * 12 + self.train_matrix.shape[0] * 16  # col, val, crow and row ids
        return 4 * size < torch.cuda.mem_get_info(device)[0]

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of training rows. Held on the device, the loader yields only each batch's row
        numbers and `on_after_batch_transfer` cuts the rows there: no per-batch host work or copy beyond
        the shuffle. Otherwise the host slices CSR rows, in `num_workers` processes, into pinned memory
        when a GPU is to receive them."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.fold)
        trained = np.flatnonzero(np.diff(self.train_matrix.indptr))  # rows with training ratings: not held-out users
        sampler = ([list(range(self.n_rows))] if self.whole_matrix() else
                   ShuffledBatches(self.n_rows, self.batch_size, generator,
                                   None if len(trained) == self.n_rows else trained))
        device = self.device()
        if self.holds_batches_on_device(device):
            return DataLoader(_RowNumbers(self.n_rows), sampler=sampler, batch_size=None)
        return DataLoader(_RowBatches(self.train_matrix), sampler=sampler, batch_size=None,
                          num_workers=self.num_workers, pin_memory=device.type == "cuda")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, torch.Tensor):  # already rows: sliced on the host, or an evaluation batch
            return batch
        if self._held is None or self._held.crow.device != batch.device:  # once per fit
            self._held = SparseRows.from_csr(self.train_matrix, np.arange(self.n_rows)).to(batch.device)
        return self._held.take(batch)

    def teardown(self, stage: str) -> None:
        self._held = None  # free the device's copy after fit

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_batches("val", self.whole_matrix()), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_batches("test", self.whole_matrix()), batch_size=None)

    def eval_batches(self, part: str, whole_matrix: bool = False) -> list[EvalBatch]:
        """The batches that score `part`: "val" feeds the training ratings (and held-out users' fold-in ones)
        and scores the validation ones, "test" feeds everything but the test part and scores the test ratings."""
        inputs, targets = {"val": (self.val_inputs, self.val_matrix),
                           "test": (self.test_inputs, self.test_matrix)}[part]
        return eval_batches(inputs, targets, whole_matrix, self.eval_batch_size)


def eval_batches(inputs: sp.csr_matrix, targets: sp.csr_matrix, whole_matrix: bool = False,
                 batch_size: int = 1024) -> list[EvalBatch]:
    """Batches that feed the rows of `inputs` and score the ratings of `targets` (same shape), with fallbacks
    where a row or column has no input. Their held-out ratings, concatenated, are `targets`' in CSR order.
    `whole_matrix`: one batch of every row, in order; else only rows with held-out ratings, `batch_size` a
    batch."""
    fallback = sp.csr_matrix((fallback_predictions(inputs, targets), targets.indices, targets.indptr),
                             shape=targets.shape)
    if whole_matrix:  # every row, in order, at once
        rows, size = np.arange(targets.shape[0]), targets.shape[0]
    else:  # only rows with held-out ratings need a forward pass
        rows, size = np.flatnonzero(np.diff(targets.indptr)), batch_size
    batches = []
    for start in range(0, len(rows), size):
        r = rows[start:start + size]
        batches.append(EvalBatch(SparseRows.from_csr(inputs, r), SparseRows.from_csr(targets, r),
                                 torch.from_numpy(fallback[r].data)))
    return batches
