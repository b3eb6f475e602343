"""Ratings from a table of your own: a CSV or TSV file with a header row (the separator detected, or given),
a Parquet file, or a pandas DataFrame; the columns that hold the user, the item, the rating and, optionally,
the time are named. Read with pyarrow, in parallel and without a Python object per row: a 20M-row CSV loads
in seconds (benchmarks/table_load.py).

Every error names the file and line (a Parquet file or a DataFrame: the row) and the value at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cfae.checks import DataError
from cfae.data.ratings import Ratings

ROLES = ("user", "item", "rating", "timestamp")  # data.columns.<role>: the column that holds it
SEPARATORS = (",", "\t", ";", "|")
NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def read_table(path: str | Path, columns: Mapping[str, str | None], sep: str | None = None,
               scale: tuple[float, float] | None = None) -> Ratings:
    """The ratings of a CSV/TSV file (a header row naming the columns; `sep` or the one its header uses) or
    a Parquet file (.parquet, .pq), their values checked: `scale`, if given, bounds the ratings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file")
    names = _names(columns)
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            present = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a Parquet file pyarrow can read ({str(err).splitlines()[0]})") from None
        _check_names(names, present, str(path))
        table = pq.read_table(path, columns=list(names.values()))
        return _ratings(table, names, scale, str(path), where=lambda i: f"{path} row {i + 1}", path=None)
    table = _read_csv(path, names, sep)
    # first_line: rating i is on line i + 2, below the header (blank lines are rows too: refused, never skipped)
    return _ratings(table, names, scale, str(path), where=lambda i: f"{path} line {i + 2}", path=path, first_line=2)


def from_frame(frame, columns: Mapping[str, str | None], scale: tuple[float, float] | None = None,
               name: str = "DataFrame") -> Ratings:
    """The ratings of a pandas DataFrame (or anything pyarrow takes as a table), their values checked."""
    names = _names(columns)
    _check_names(names, [str(c) for c in frame.columns], f"the {name}")
    table = pa.Table.from_pandas(frame[list(names.values())], preserve_index=False)
    return _ratings(table, names, scale, f"the {name}", where=lambda i: f"the {name}'s row {i + 1}", path=None)


def _names(columns: Mapping[str, str | None]) -> dict[str, str]:
    """{role: column} for the roles given; user, item and rating are required."""
    names = {role: str(columns[role]) for role in ROLES if columns.get(role) is not None}
    unknown = sorted(set(columns) - set(ROLES))
    if unknown:
        raise DataError(f"data.columns.{unknown[0]}: not a column role (the roles: {', '.join(ROLES)})")
    missing = [r for r in ROLES[:3] if r not in names]
    if missing:
        raise DataError(f"data.columns.{missing[0]} is missing: name the column that holds the {missing[0]}")
    return names


def _check_names(names: dict[str, str], present: list[str], where: str) -> None:
    for role, name in names.items():
        if name not in present:
            raise DataError(f"data.columns.{role}={name}: {where} has no such column (it has: {', '.join(present)})")


def _read_csv(path: Path, names: dict[str, str], sep: str | None) -> pa.Table:
    import pyarrow.csv as pv

    with path.open("rb") as f:
        header = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    if sep is None:
        counts = {s: header.count(s) for s in SEPARATORS}
        sep = max(counts, key=counts.get)
        if counts[sep] == 0:
            raise DataError(f"{path} line 1: no separator ({', '.join(map(repr, SEPARATORS))}) in the header "
                            f"{header[:80]!r}; a table needs a header row naming its columns (or set data.sep)")
    if len(sep) != 1:
        raise DataError(f"data.sep={sep!r}: a table's separator is one character (MovieLens's '::' files: "
                        f"data=ml1m, data=ml10m)")
    present = [c.strip().strip('"') for c in header.split(sep)]
    _check_names(names, present, str(path))
    read = dict(read_options=pv.ReadOptions(block_size=1 << 25),
                parse_options=pv.ParseOptions(delimiter=sep, ignore_empty_lines=False))
    try:
        try:  # typed as the first rows say: text ids as dictionaries (codes, not a string per row), float32 ratings
            return pv.read_csv(path, **read, convert_options=pv.ConvertOptions(
                include_columns=list(names.values()), column_types=_types(path, names, read)))
        except pa.ArrowInvalid:  # a later value does not fit the type: read as found, the checks name it
            return pv.read_csv(path, **read, convert_options=pv.ConvertOptions(include_columns=list(names.values())))
    except pa.ArrowInvalid as err:  # a row with another number of fields: find its line
        with path.open("rb") as f:
            width = len(present)
            for number, line in enumerate(f, start=1):
                if line.strip() and len(line.decode("utf-8", errors="replace").split(sep)) != width:
                    shown = line.decode("utf-8", errors="replace").strip()[:80]
                    raise DataError(f"{path} line {number}: expected {width} fields separated by {sep!r}, "
                                    f"got {len(shown.split(sep))}: {shown!r}") from None
        raise DataError(f"{path}: {str(err).splitlines()[0]}") from None


def _types(path: Path, names: dict[str, str], read: dict) -> dict[str, pa.DataType]:
    """The columns' types as the file's first megabyte has them, text ids as dictionaries, ratings float32."""
    import io

    import pyarrow.csv as pv

    with path.open("rb") as f:
        head = f.read(1 << 20)
    head = head[:head.rfind(b"\n") + 1] or head
    sample = pv.read_csv(io.BytesIO(head), **read, convert_options=pv.ConvertOptions(
        include_columns=list(names.values()))).schema
    types = {}
    for role, name in names.items():
        kind = sample.field(name).type
        if role in ("user", "item"):
            types[name] = pa.dictionary(pa.int32(), pa.string()) if pa.types.is_string(kind) else kind
        elif role == "rating" and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            types[name] = pa.float32()
        else:
            types[name] = kind
    return types


def _ratings(table: pa.Table, names: dict[str, str], scale: tuple[float, float] | None, source: str, where,
             path: Path | None, first_line: int = 1) -> Ratings:
    """Ratings from the table's columns: ids as integers or as codes into their text, ratings as numbers
    (on `scale` if given), times as seconds. `where(i)` says where row i is."""
    if table.num_rows == 0:
        raise DataError(f"{source}: no ratings")
    users, user_names = _ids(table[names["user"]], "user", where)
    items, item_names = _ids(table[names["item"]], "item", where)
    ratings = _numbers(table[names["rating"]], "rating", where).astype(np.float32)
    if scale is not None:
        low, high = scale
        outside = np.flatnonzero((ratings < low) | (ratings > high))
        if len(outside):
            i = outside[0]
            raise DataError(f"{where(i)}: rating {ratings[i]:g} outside data.scale=[{low:g}, {high:g}]")
    timestamps = _seconds(table[names["timestamp"]], where) if "timestamp" in names else None
    del table
    pa.default_memory_pool().release_unused()  # the table's buffers back to the system, before the matrix is built
    return Ratings(users, items, ratings, path, first_line, timestamps, user_names, item_names)


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _present(column: pa.ChunkedArray, role: str, where) -> None:
    if column.null_count:
        raise DataError(f"{where(_first(pc.is_null(column)))}: no {role} (an empty field)")


def _ids(column: pa.ChunkedArray, role: str, where) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, None) for an integer column; (codes, names) for text, codes indexing its distinct values."""
    _present(column, role, where)
    if pa.types.is_integer(column.type):
        return column.to_numpy().astype(np.int64, copy=False), None
    if pa.types.is_floating(column.type):
        whole = pc.equal(column, pc.floor(column))
        if not pc.all(whole).as_py():
            i = _first(pc.invert(whole))
            raise DataError(f"{where(i)}: {role} id {column[i].as_py()!r} is neither a whole number nor text")
        return column.to_numpy().astype(np.int64), None
    if not pa.types.is_dictionary(column.type):
        column = pa.chunked_array([c.dictionary_encode() for c in column.chunks])
    column = column.unify_dictionaries()
    names = column.chunk(0).dictionary if column.num_chunks else pa.array([], pa.string())
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in column.chunks])
    empty = np.flatnonzero(pc.equal(pc.utf8_length(pc.cast(names, pa.string())), 0).to_numpy(zero_copy_only=False))
    if len(empty):
        raise DataError(f"{where(int(np.flatnonzero(codes == empty[0])[0]))}: no {role} (an empty field)")
    return codes, np.asarray(pc.cast(names, pa.string()).to_pylist(), dtype=str)


def _numbers(column: pa.ChunkedArray, role: str, where) -> np.ndarray:
    _present(column, role, where)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = column.to_numpy()
    else:  # text: a value that is no number, somewhere (pyarrow read the whole column as text)
        text = pc.cast(column, pa.string())
        numeric = pc.match_substring_regex(text, NUMBER)
        if not pc.all(numeric).as_py():
            i = _first(pc.invert(numeric))
            raise DataError(f"{where(i)}: {role} {text[i].as_py()!r} is not a number")
        values = pc.cast(text, pa.float64()).to_numpy()
    finite = np.isfinite(values) if values.dtype.kind == "f" else np.ones(len(values), dtype=bool)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{where(i)}: {role} {values[i]!r} is not a finite number")
    return values


def _seconds(column: pa.ChunkedArray, where) -> np.ndarray:
    """Times as integer seconds: a column of integers (Unix time) as it is, dates and times converted."""
    _present(column, "timestamp", where)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64()).to_numpy()
    if pa.types.is_string(column.type):
        try:
            return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64()).to_numpy()
        except pa.ArrowInvalid:
            pass
    values = _numbers(column, "timestamp", where)
    return values.astype(np.int64)
