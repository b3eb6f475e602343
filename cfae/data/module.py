"""The LightningDataModule: a MovieLens release (or ratings in memory) split into training, validation and
test parts, served as batches of sparse rows."""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from cfae.checks import DataError, is_int
from cfae.data.means import fallback_predictions
from cfae.data.movielens import (
    Ratings,
    build_matrix,
    dataset_spec,
    file_digest,
    locate_ratings,
    read_ratings,
    read_titles,
)
from cfae.data.splits import GROUPLENS_SPLITS, check_split, grouplens_test_lines, split_fixed_test, split_ratings
from cfae.sparse import EvalBatch, SparseRows

log = logging.getLogger(__name__)



class ShuffledBatches(torch.utils.data.Sampler[list[int]]):
    """Row numbers in a fresh random order each epoch, cut into batches; every row is served once. A
    last batch of a single row joins the one before it (batch normalisation cannot train on one row)."""

    def __init__(self, n_rows: int, batch_size: int, generator: torch.Generator):
        self.n_rows, self.batch_size, self.generator = n_rows, batch_size, generator

    def __iter__(self):  # a generator: the order is drawn at the first batch, not when iter() is called, so
        # an iterator made and dropped unused (DataLoader's worker set-up does so) takes no draw of its own
        batches = list(torch.randperm(self.n_rows, generator=self.generator).split(self.batch_size))
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


class MovieLensDataModule(L.LightningDataModule):
    """Sparse MovieLens rows for autoencoders.

    `orientation="item"` makes each row an item's ratings by all users (I-AutoRec); `"user"` makes each
    row a user's ratings of all items (U-AutoRec, the study's choice). Validation feeds each row's
    training ratings and scores its validation ratings; test feeds training + validation ratings and
    scores the test ratings, which choose nothing.
    """

    def __init__(
        self,
        dataset: str = "ml1m",
        root: str | None = None,  # None: $CFAE_DATA_DIR, else the user cache
        download: bool = True,
        min_item_ratings: int = 10,  # the study, sec. 4.1
        orientation: str = "item",
        split: str = "random",  # random: fold `fold` of `n_folds`; u1..u5: GroupLens's ML-100K splits
        fold: int = 0,
        n_folds: int = 5,
        test_fraction: float = 0.2,
        val_fraction: float = 0.05,
        seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        batches_on_device: str | bool = "auto",  # see train_dataloader
        num_workers: int = 0,  # for batches sliced on the host
    ):
        super().__init__()
        self.spec = dataset_spec(dataset)
        if orientation not in ("item", "user"):
            raise DataError(f"data.orientation={orientation!r}: expected 'item' or 'user'")
        check_split(fold, n_folds, test_fraction, val_fraction)  # bad settings fail here, not at setup
        if split != "random":
            if split not in GROUPLENS_SPLITS:
                raise DataError(f"data.split={split!r}: expected 'random' or one of {', '.join(GROUPLENS_SPLITS)}")
            if dataset != "ml100k":
                raise DataError(f"data.split={split} is one of GroupLens's ML-100K splits; data.dataset is {dataset}")
            if min_item_ratings > 1:
                raise DataError(f"data.split={split} holds every rating of u.data; data.min_item_ratings="
                                f"{min_item_ratings} would drop some of its test part (set it to 0, as "
                                "data=ml100k_u1 does)")
        for key, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not (is_int(size) and size > 0):
                raise DataError(f"data.{key}={size}: must be a positive integer")
        self.dataset, self.root, self.download = dataset, root, download
        self.min_item_ratings, self.orientation = min_item_ratings, orientation
        self.split, self.fold, self.n_folds = split, fold, n_folds
        self.test_fraction, self.val_fraction = test_fraction, val_fraction
        self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size
        if batches_on_device not in ("auto", True, False):
            raise DataError(f"data.batches_on_device={batches_on_device!r}: expected auto, true or false")
        self.batches_on_device, self.num_workers = batches_on_device, num_workers
        self._held: SparseRows | None = None  # the training matrix, on the device that cuts batches from it
        self.given: tuple[Ratings, str] | None = None  # (ratings, name) for a module over ratings in memory
        self.prepared = False

    def prepare_data(self) -> None:
        if self.given is None:  # ratings given in memory need no files
            locate_ratings(self.dataset, self.root, self.download)

    @classmethod
    def from_ratings(cls, ratings: Ratings, name: str = "in-memory", **kwargs) -> MovieLensDataModule:
        """A DataModule over ratings already in memory (synthetic benchmarks), split and batched the same way."""
        dm = cls(download=False, **kwargs)
        dm.given = (ratings, name)
        return dm

    def setup(self, stage: str | None = None) -> None:
        if self.prepared:
            return
        if self.given is not None:
            ratings, source = self.given
            checksum = hashlib.sha256(np.stack([ratings.users, ratings.items]).tobytes()).hexdigest()
            self.titles = {}
        else:
            path = locate_ratings(self.dataset, self.root, self.download)
            spec = self.spec
            ratings = read_ratings(path, spec.separator, spec.header, spec.rating_min, spec.rating_max,
                                   spec.rating_step)
            source, checksum = str(path), file_digest(path)
            self.titles = read_titles(path, spec)  # movie id -> title, for recommendations
        rm = build_matrix(ratings, self.min_item_ratings, source=source)
        self.user_ids, self.item_ids = rm.user_ids, rm.item_ids  # the original id of each user and item index
        self.stats = {**rm.stats, "sha256": checksum, "file": source}
        log.info("%s: %d users, %d items, %d ratings (dropped %d items / %d ratings with < %d ratings), sha256 %s",
                 source, *(rm.stats[k] for k in ("n_users", "n_items", "n_ratings", "dropped_items",
                                                 "dropped_ratings")), self.min_item_ratings, checksum[:12])

        m = rm.matrix.tocoo()
        rows, cols = (m.row, m.col) if self.orientation == "user" else (m.col, m.row)
        shape = m.shape if self.orientation == "user" else m.shape[::-1]
        if self.split == "random":
            split = split_ratings(m.nnz, self.fold, self.n_folds, self.test_fraction, self.val_fraction, self.seed)
        else:  # the test lines of u.data, found in the matrix by their (user, item) pair
            is_test_line = grouplens_test_lines(len(ratings.ratings), self.split, source)
            width = int(ratings.items.max()) + 1
            in_matrix = rm.user_ids[m.row] * width + rm.item_ids[m.col]
            is_test = np.isin(in_matrix, ratings.users[is_test_line] * width + ratings.items[is_test_line])
            check_split_file(Path(source).with_name(f"{self.split}.test"), ratings, is_test_line)
            split = split_fixed_test(is_test, self.val_fraction, self.seed)
        if not all(len(indices) for indices in split):
            raise DataError(f"{source}: {m.nnz} ratings are too few to split with data.test_fraction="
                            f"{self.test_fraction} and data.val_fraction={self.val_fraction}: train "
                            f"{len(split.train)}, validation {len(split.val)}, test {len(split.test)}")

        def part(*index_arrays: np.ndarray) -> sp.csr_matrix:
            i = np.concatenate(index_arrays)
            out = sp.csr_matrix((m.data[i], (rows[i], cols[i])), shape=shape)
            out.sort_indices()
            return out

        self.train_matrix = part(split.train)  # (n_rows, n_cols)
        self.val_matrix = part(split.val)
        self.test_matrix = part(split.test)
        self.train_val_matrix = part(split.train, split.val)
        self.prepared = True

    def with_validation_in_training(self) -> MovieLensDataModule:
        """A copy whose training part is the training and validation parts together (`refit=true`: a model
        trained anew once validation has chosen its epochs). Its validation loader scores ratings it trains on."""
        merged = copy.copy(self)
        merged.train_matrix, merged._held = self.train_val_matrix, None
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
        return self.spec.rating_min, self.spec.rating_max

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
        sampler = ([list(range(self.n_rows))] if self.whole_matrix() else
                   ShuffledBatches(self.n_rows, self.batch_size, generator))
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
        """The batches that score `part`: "val" feeds the training ratings and scores the validation ones,
        "test" feeds training + validation and scores the test ratings. Their held-out ratings, concatenated,
        are the part's matrix's in CSR order. `whole_matrix`: one batch of every row, in order."""
        inputs, targets = {"val": (self.train_matrix, self.val_matrix),
                           "test": (self.train_val_matrix, self.test_matrix)}[part]
        fallback = sp.csr_matrix((fallback_predictions(inputs, targets), targets.indices, targets.indptr),
                                 shape=targets.shape)
        if whole_matrix:  # every row, in order, at once
            rows, size = np.arange(targets.shape[0]), targets.shape[0]
        else:  # only rows with held-out ratings need a forward pass
            rows, size = np.flatnonzero(np.diff(targets.indptr)), self.eval_batch_size
        batches = []
        for start in range(0, len(rows), size):
            r = rows[start:start + size]
            batches.append(EvalBatch(SparseRows.from_csr(inputs, r), SparseRows.from_csr(targets, r),
                                     torch.from_numpy(fallback[r].data)))
        return batches
