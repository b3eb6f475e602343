"""MovieLens ratings: files on disk (or downloaded and verified), the study's preprocessing, five random
80:20 splits, and a LightningDataModule whose batches are sparse rows.

The rating matrix is kept as scipy.sparse CSR throughout: ML-1M is 95.5% empty, so nothing here ever
builds a dense users x items array.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cfae.checks import UsageError, is_int, is_number
from cfae.sparse import EvalBatch, SparseRows

log = logging.getLogger(__name__)


class DataError(UsageError, ValueError):
    """Bad or missing input data; the message names the file (and line) at fault."""


# ----------------------------------------------------------------------------------------------------
# Datasets: where the files live and how to read them


@dataclass(frozen=True)
class DatasetSpec:
    """One MovieLens release: its archive, its ratings file and that file's format."""

    dirname: str  # folder inside the archive and under the data root, e.g. "ml-1m"
    ratings_file: str
    separator: str
    url: str
    md5: str  # of the official archive, as published by GroupLens
    header: bool = False
    rating_min: float = 1.0
    rating_max: float = 5.0


GROUPLENS = "https://files.grouplens.org/datasets/movielens"
DATASETS: dict[str, DatasetSpec] = {
    "ml100k": DatasetSpec("ml-100k", "u.data", "\t", f"{GROUPLENS}/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
    "ml1m": DatasetSpec("ml-1m", "ratings.dat", "::", f"{GROUPLENS}/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
    # ML-10M unpacks to ml-10M100K/; its ratings (and ML-20M's) go in half stars from 0.5
    "ml10m": DatasetSpec("ml-10M100K", "ratings.dat", "::", f"{GROUPLENS}/ml-10m.zip",
                         "ce571fd55effeba0271552578f2648bd", rating_min=0.5),
    "ml20m": DatasetSpec("ml-20m", "ratings.csv", ",", f"{GROUPLENS}/ml-20m.zip",
                         "cd245b17a1ae2cc31bb14903e1204af3", header=True, rating_min=0.5),
}


def default_data_root() -> Path:
    """$CFAE_DATA_DIR, else the user cache directory ($XDG_CACHE_HOME/cfae or ~/.cache/cfae)."""
    if os.environ.get("CFAE_DATA_DIR"):
        return Path(os.environ["CFAE_DATA_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cfae"


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def locate_ratings(name: str, root: str | Path | None = None, download: bool = True) -> Path:
    """Path of `name`'s ratings file under `root/<dirname>/`, downloading the archive if it is absent.

    A root that is named (`root` or $CFAE_DATA_DIR) must exist: a typo there should not start a download
    into a fresh folder. Only the default user cache is created on demand.
    """
    spec = dataset_spec(name)
    named = root or os.environ.get("CFAE_DATA_DIR")
    root = Path(named).expanduser() if named else default_data_root()
    if named and not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data root {root} {problem} (CFAE_DATA_DIR or data.root)")
    path = root / spec.dirname / spec.ratings_file
    if path.is_file():
        return path
    if not download:
        raise DataError(f"{path} not found and data.download=false: put {spec.ratings_file} from {spec.url} "
                        f"in {path.parent}/, or set data.download=true")
    fetch_archive(spec, root)
    return path


def fetch_archive(spec: DatasetSpec, root: Path) -> None:
    """Download `spec.url`, check its MD5, and unpack it into `root/<dirname>/` atomically.

    Everything is written to a temporary folder beside the target and renamed into place only once the
    checksum matched, so an interrupted or failed download leaves no partial dataset behind.
    """
    target = root / spec.dirname
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{spec.dirname}-") as tmp:
        archive = Path(tmp) / "archive.zip"
        log.info("downloading %s to %s", spec.url, target)
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as response, open(archive, "wb") as out:
                size = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc=spec.dirname) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError) as err:
            raise DataError(
                f"{target / spec.ratings_file} not found and {spec.url} could not be downloaded ({err}). "
                f"Offline? Put {spec.ratings_file} from that archive in {target}/ "
                f"or point CFAE_DATA_DIR at a folder holding {spec.dirname}/{spec.ratings_file}."
            ) from None  # the message carries the cause; a chained traceback would bury it
        digest = file_digest(archive, "md5")
        if digest != spec.md5:
            raise DataError(f"checksum mismatch for {spec.url}: md5 {digest}, expected {spec.md5}; nothing was kept")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(unpacked)
        if not (unpacked / spec.dirname / spec.ratings_file).is_file():
            raise DataError(f"{spec.url} holds no {spec.dirname}/{spec.ratings_file}")
        if target.exists():  # an incomplete folder without the ratings file: replace it
            shutil.rmtree(target)
        os.replace(unpacked / spec.dirname, target)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Parsing


class Ratings(NamedTuple):
    users: np.ndarray  # (n,) int64 original ids
    items: np.ndarray  # (n,) int64 original ids
    ratings: np.ndarray  # (n,) float32
    # the file read, if any: errors found after parsing cite rating i as its line first_line + i
    path: Path | None = None
    first_line: int = 1


def read_ratings(path: str | Path, separator: str, header: bool = False,
                 rating_min: float = 1.0, rating_max: float = 5.0) -> Ratings:
    """Read `user<sep>item<sep>rating[<sep>timestamp]` lines, every line with the same number of fields.

    Blank lines at the end are ignored; anywhere else they are an error, so that rating i is always on
    line `first_line + i`. The file is parsed in one vectorised pass; only if that finds a problem is it
    walked line by line, to name the first bad line in the error.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the ratings file ({err.strerror})") from None
    first_line = 2 if header else 1
    body = (text.partition(b"\n")[2] if header else text).rstrip()  # trailing blank lines are harmless
    if not body:
        only_header = header and text.strip()
        raise DataError(f"{path}: no ratings below the header line" if only_header
                        else f"{path}: the file is empty (no ratings)")
    sep = separator.encode()
    n_lines = body.count(b"\n") + 1
    end = body.find(b"\n")
    n_fields = len((body[:end] if end >= 0 else body).replace(sep, b" ").split())
    try:
        tokens = np.array(body.replace(sep, b" ").split())
        if n_fields not in (3, 4) or len(tokens) != n_lines * n_fields:
            raise ValueError
        table = tokens.reshape(n_lines, n_fields)
        users = table[:, 0].astype(np.int64)
        items = table[:, 1].astype(np.int64)
        ratings = table[:, 2].astype(np.float32)
    except (ValueError, OverflowError):  # OverflowError: an id beyond int64
        raise _first_bad_line(path, body, first_line, separator, rating_min, rating_max) from None
    if not (np.all(ratings >= rating_min) and np.all(ratings <= rating_max)):
        raise _first_bad_line(path, body, first_line, separator, rating_min, rating_max)
    return Ratings(users, items, ratings, path, first_line)


def _first_bad_line(path: Path, body: bytes, first_line: int, separator: str,
                    rating_min: float, rating_max: float) -> DataError:
    """The error for the first line of `body` (which starts on line `first_line`) that read_ratings cannot
    take. It splits and converts the same bytes the same way (numpy's int64 cast of bytes is int()), so
    it finds every line the vectorised pass rejected."""
    sep = separator.encode()
    lines = body.split(b"\n")
    counts = [len(line.replace(sep, b" ").split()) for line in lines]
    # the field count most lines have is the expected one, so a bad first line is blamed, not its followers
    usual = Counter(c for c in counts if c).most_common(1)[0][0]
    allowed, expected = ((usual,), str(usual)) if usual in (3, 4) else ((3, 4), "3 or 4")
    for number, (line, count) in enumerate(zip(lines, counts), start=first_line):
        if count == 0:
            return DataError(f"{path} line {number} is blank (only blank lines at the end of the file are ignored)")
        if count not in allowed:
            problem = f"expected {expected} fields separated by {separator!r}, got {count}"
        else:
            problem = _field_problem(line.replace(sep, b" ").split(), rating_min, rating_max)
        if problem:
            shown = line.strip().decode("utf-8", errors="replace")[:80]
            return DataError(f"{path} line {number}: {problem}: {shown!r}")
    return DataError(f"{path}: unreadable ratings file")  # unreachable while both passes parse alike


def _field_problem(fields: list[bytes], rating_min: float, rating_max: float) -> str | None:
    try:
        user, item, rating = int(fields[0]), int(fields[1]), float(fields[2])
    except ValueError:
        return "user and item must be integers and the rating a number"
    if not (-2**63 <= user < 2**63 and -2**63 <= item < 2**63):
        return "user or item id out of the 64-bit integer range"
    # read_ratings compares float32 values: judge the same number
    if not rating_min <= rating <= rating_max and not rating_min <= np.float32(rating) <= rating_max:
        return f"rating {rating:g} outside [{rating_min:g}, {rating_max:g}]"
    return None


# ----------------------------------------------------------------------------------------------------
# The study's preprocessing


@dataclass
class RatingMatrix:
    """Users x items ratings after filtering, with contiguous indices."""

    matrix: sp.csr_matrix  # (n_users, n_items) float32, canonical CSR (sorted, no duplicates)
    user_ids: np.ndarray  # original id of each row
    item_ids: np.ndarray  # original id of each column
    dropped_items: int
    dropped_ratings: int

    @property
    def stats(self) -> dict[str, float]:
        n_users, n_items = self.matrix.shape
        return {
            "n_users": n_users,
            "n_items": n_items,
            "n_ratings": self.matrix.nnz,
            "density": self.matrix.nnz / (n_users * n_items),
            "dropped_items": self.dropped_items,
            "dropped_ratings": self.dropped_ratings,
        }


def build_matrix(ratings: Ratings, min_item_ratings: int = 10, source: str = "ratings") -> RatingMatrix:
    """Drop items with fewer than `min_item_ratings` ratings (the study's cleaning), index the rest.

    `source` names ratings not read from a file in errors; those from a file are cited by path and line.
    """
    where = str(ratings.path) if ratings.path is not None else source
    if len(ratings.ratings) == 0:
        raise DataError(f"{where}: no ratings")
    item_ids, item_index, item_counts = np.unique(ratings.items, return_inverse=True, return_counts=True)
    keep_item = item_counts >= min_item_ratings
    keep = keep_item[item_index]
    if not keep.any():
        raise DataError(f"{where}: no ratings left after dropping movies with fewer than {min_item_ratings} "
                        f"ratings (data.min_item_ratings); the most-rated movie has {item_counts.max()}")
    user_ids, rows = np.unique(ratings.users[keep], return_inverse=True)
    kept_items, cols = np.unique(item_index[keep], return_inverse=True)
    matrix = sp.csr_matrix((ratings.ratings[keep], (rows, cols)), shape=(len(user_ids), len(kept_items)))
    if matrix.nnz != int(keep.sum()):  # the CSR conversion summed a repeated (user, item) pair into one cell
        raise _repeated_pair(ratings, where)
    matrix.sort_indices()
    return RatingMatrix(matrix, user_ids, item_ids[kept_items],
                        dropped_items=int((~keep_item).sum()), dropped_ratings=int((~keep).sum()))


def _repeated_pair(ratings: Ratings, where: str) -> DataError:
    """The error for the earliest rating whose (user, item) pair was rated before, citing both."""
    position = np.arange(len(ratings.ratings))
    order = np.lexsort((position, ratings.items, ratings.users))  # by pair, then by position
    u, i = ratings.users[order], ratings.items[order]
    repeats = np.flatnonzero((u[1:] == u[:-1]) & (i[1:] == i[:-1]))  # order[k + 1] repeats order[k]
    k = repeats[np.argmin(order[repeats + 1])]
    # the earliest repeat is its pair's second rating, so the one sorted just before it is the first
    first, again = order[k], order[k + 1]
    pair = f"user {ratings.users[again]}, item {ratings.items[again]} is rated again"
    if ratings.path is None:
        return DataError(f"{where}: {pair} (rating {again + 1}, first as rating {first + 1})")
    return DataError(f"{where} line {ratings.first_line + again}: {pair} (first on line {ratings.first_line + first})")


# ----------------------------------------------------------------------------------------------------
# Splits


class Split(NamedTuple):
    train: np.ndarray  # indices into the ratings (CSR data order)
    val: np.ndarray
    test: np.ndarray


def check_split(fold: int, n_folds: int, test_fraction: float, val_fraction: float) -> None:
    if not 0 <= fold < n_folds:
        raise DataError(f"data.fold={fold} is outside 0..{n_folds - 1}")
    if not (is_number(test_fraction) and 0 < test_fraction < 1):
        raise DataError(f"data.test_fraction={test_fraction}: must be > 0 and < 1")
    if not (is_number(val_fraction) and 0 < val_fraction < 1):
        raise DataError(f"data.val_fraction={val_fraction}: must be > 0 and < 1 (validation drives early stopping)")


def split_ratings(n_ratings: int, fold: int, n_folds: int = 5, test_fraction: float = 0.2,
                  val_fraction: float = 0.05, seed: int = 0) -> Split:
    """Fold `fold` of `n_folds` independent random splits, as in the study (sec. 4.1: "the test sets are
    not disjoint but rather sampled randomly"). The validation part is `val_fraction` of the training part.
    """
    check_split(fold, n_folds, test_fraction, val_fraction)
    order = np.random.default_rng([seed, fold]).permutation(n_ratings)
    n_test = round(test_fraction * n_ratings)
    n_val = round(val_fraction * (n_ratings - n_test))
    return Split(train=np.sort(order[n_test + n_val:]), val=np.sort(order[n_test:n_test + n_val]),
                 test=np.sort(order[:n_test]))


# ----------------------------------------------------------------------------------------------------
# Batches


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


def rating_means(matrix: sp.csr_matrix, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean stored rating of each column (axis=0) or row (axis=1), the global mean where there is
    none, and how many ratings each has."""
    owner = matrix.indices if axis == 0 else np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    size = matrix.shape[1 - axis]
    counts = np.bincount(owner, minlength=size)
    sums = np.bincount(owner, matrix.data, minlength=size)
    return np.divide(sums, counts, out=np.full(size, matrix.data.mean()), where=counts > 0), counts


def fallback_predictions(inputs: sp.csr_matrix, targets: sp.csr_matrix) -> np.ndarray:
    """For each held-out rating (in `targets`' CSR order): NaN if the model can predict it, else a
    fallback. A rating whose row has no input ratings gets its column's mean, one whose column has no
    input ratings gets its row's mean, and one with neither gets the global mean."""
    global_mean = inputs.data.mean()
    row_mean, row_n = rating_means(inputs, axis=1)
    col_mean, col_n = rating_means(inputs, axis=0)
    t = targets.tocoo()
    row_ok, col_ok = row_n[t.row] > 0, col_n[t.col] > 0
    fallback = np.where(row_ok, row_mean[t.row], col_mean[t.col])  # a usable side's mean...
    fallback = np.where(row_ok | col_ok, fallback, global_mean)  # ...or the global mean if neither is
    return np.where(row_ok & col_ok, np.nan, fallback).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# The DataModule


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
        for key, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not (is_int(size) and size > 0):
                raise DataError(f"data.{key}={size}: must be a positive integer")
        self.dataset, self.root, self.download = dataset, root, download
        self.min_item_ratings, self.orientation = min_item_ratings, orientation
        self.fold, self.n_folds, self.test_fraction, self.val_fraction = fold, n_folds, test_fraction, val_fraction
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
        else:
            path = locate_ratings(self.dataset, self.root, self.download)
            spec = self.spec
            ratings = read_ratings(path, spec.separator, spec.header, spec.rating_min, spec.rating_max)
            source, checksum = str(path), file_digest(path)
        rm = build_matrix(ratings, self.min_item_ratings, source=source)
        self.stats = {**rm.stats, "sha256": checksum, "file": source}
        log.info("%s: %d users, %d items, %d ratings (dropped %d items / %d ratings with < %d ratings), sha256 %s",
                 source, *(rm.stats[k] for k in ("n_users", "n_items", "n_ratings", "dropped_items",
                                                 "dropped_ratings")), self.min_item_ratings, checksum[:12])

        m = rm.matrix.tocoo()
        rows, cols = (m.row, m.col) if self.orientation == "user" else (m.col, m.row)
        shape = m.shape if self.orientation == "user" else m.shape[::-1]
        split = split_ratings(m.nnz, self.fold, self.n_folds, self.test_fraction, self.val_fraction, self.seed)
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
        sampler = ShuffledBatches(self.n_rows, self.batch_size, generator)
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
        return DataLoader(self._eval_batches(self.train_matrix, self.val_matrix), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._eval_batches(self.train_val_matrix, self.test_matrix), batch_size=None)

    def _eval_batches(self, inputs: sp.csr_matrix, targets: sp.csr_matrix) -> list[EvalBatch]:
        fallback = sp.csr_matrix((fallback_predictions(inputs, targets), targets.indices, targets.indptr),
                                 shape=targets.shape)
        rows = np.flatnonzero(np.diff(targets.indptr))  # only rows with held-out ratings need a forward pass
        batches = []
        for start in range(0, len(rows), self.eval_batch_size):
            r = rows[start:start + self.eval_batch_size]
            batches.append(EvalBatch(SparseRows.from_csr(inputs, r), SparseRows.from_csr(targets, r),
                                     torch.from_numpy(fallback[r].data)))
        return batches
