"""MovieLens ratings files: where each release lives (on disk, or downloaded from GroupLens and verified),
and how its ratings file is read (every bad line named) into `Ratings`.
"""

from __future__ import annotations

import csv
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

import numpy as np
from tqdm import tqdm

from cfae.checks import DataError
from cfae.data.ratings import Ratings

log = logging.getLogger(__name__)


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
    rating_step: float = 1.0  # whole stars; ML-10M and ML-20M rate in half stars
    titles_file: str = "movies.dat"  # movie id, title, ... (latin-1 before ML-20M, UTF-8 CSV in it)


GROUPLENS = "https://files.grouplens.org/datasets/movielens"
DATASETS: dict[str, DatasetSpec] = {
    "ml100k": DatasetSpec("ml-100k", "u.data", "\t", f"{GROUPLENS}/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723",
                          titles_file="u.item"),
    "ml1m": DatasetSpec("ml-1m", "ratings.dat", "::", f"{GROUPLENS}/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
    # ML-10M unpacks to ml-10M100K/; its ratings (and ML-20M's) go in half stars from 0.5
    "ml10m": DatasetSpec("ml-10M100K", "ratings.dat", "::", f"{GROUPLENS}/ml-10m.zip",
                         "ce571fd55effeba0271552578f2648bd", rating_min=0.5, rating_step=0.5),
    "ml20m": DatasetSpec("ml-20m", "ratings.csv", ",", f"{GROUPLENS}/ml-20m.zip",
                         "cd245b17a1ae2cc31bb14903e1204af3", header=True, rating_min=0.5, rating_step=0.5,
                         titles_file="movies.csv"),
}


def read_titles(ratings_path: Path, spec: DatasetSpec) -> dict[int, str]:
    """Movie id -> title, from the release's movie file beside its ratings; empty if there is none (the
    titles only label recommendations)."""
    path = Path(ratings_path).parent / spec.titles_file
    if not path.is_file():
        return {}
    if path.suffix == ".csv":  # ML-20M: movieId,title,genres with quoted titles
        with path.open(newline="", encoding="utf-8") as f:
            return {int(row[0]): row[1] for row in list(csv.reader(f))[1:] if row}
    separator = "|" if spec.titles_file == "u.item" else "::"
    titles = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        fields = line.split(separator)
        if len(fields) >= 2 and fields[0].strip().isdigit():
            titles[int(fields[0])] = fields[1]
    return titles


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


def read_ratings(path: str | Path, separator: str, header: bool = False, rating_min: float = 1.0,
                 rating_max: float = 5.0, rating_step: float | None = None) -> Ratings:
    """Read `user<sep>item<sep>rating[<sep>timestamp]` lines, every line with the same number of fields, each
    rating on the scale (and, given `rating_step`, a whole number of steps above `rating_min`).

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
        timestamps = table[:, 3].astype(np.int64) if n_fields == 4 else None
    except (ValueError, OverflowError):  # OverflowError: an id beyond int64
        raise _first_bad_line(path, body, first_line, separator, rating_min, rating_max, rating_step) from None
    if not (np.all(ratings >= rating_min) and np.all(ratings <= rating_max) and
            (rating_step is None or np.all(off_step(ratings, rating_min, rating_step) == 0))):
        raise _first_bad_line(path, body, first_line, separator, rating_min, rating_max, rating_step)
    return Ratings(users, items, ratings, path, first_line, timestamps)


def off_step(ratings, rating_min: float, rating_step: float):
    """How far each rating lies from the scale's steps (0 on a step)."""
    return np.fmod(np.asarray(ratings, dtype=np.float64) - rating_min, rating_step)


def _first_bad_line(path: Path, body: bytes, first_line: int, separator: str,
                    rating_min: float, rating_max: float, rating_step: float | None = None) -> DataError:
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
            problem = _field_problem(line.replace(sep, b" ").split(), rating_min, rating_max, rating_step)
        if problem:
            shown = line.strip().decode("utf-8", errors="replace")[:80]
            return DataError(f"{path} line {number}: {problem}: {shown!r}")
    return DataError(f"{path}: unreadable ratings file")  # unreachable while both passes parse alike


def _field_problem(fields: list[bytes], rating_min: float, rating_max: float,
                   rating_step: float | None = None) -> str | None:
    try:
        user, item, rating = int(fields[0]), int(fields[1]), float(fields[2])
    except ValueError:
        return "user and item must be integers and the rating a number"
    if len(fields) == 4 and not fields[3].lstrip(b"+-").isdigit():
        return "the timestamp must be an integer (seconds)"
    if not (-2**63 <= user < 2**63 and -2**63 <= item < 2**63):
        return "user or item id out of the 64-bit integer range"
    # read_ratings compares float32 values: judge the same number
    if not rating_min <= rating <= rating_max and not rating_min <= np.float32(rating) <= rating_max:
        return f"rating {rating:g} outside [{rating_min:g}, {rating_max:g}]"
    if rating_step is not None and off_step(np.float32(rating), rating_min, rating_step) != 0:
        return f"rating {rating:g} is not on the scale ({rating_min:g} to {rating_max:g} in steps of {rating_step:g})"
    return None
