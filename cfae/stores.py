"""The databases that hold runs (MLflow) and studies (Optuna): safe to create from several processes at
once, and a server that does not answer is said at once instead of after minutes of retries."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from cfae.checks import UsageError


class StoreError(UsageError):
    pass


def sqlite_file(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (relative, or absolute with four slashes); None otherwise."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def check_writable(url: str) -> None:
    """A sqlite store this process cannot write (its database, its lock file, the artifacts beside it, or the
    folder it would be created in) is said now, in one line, not when the first run ends."""
    db = sqlite_file(url)
    if db is None:
        return
    existing = [p for p in (db, Path(f"{db}.lock"), db.parent / "artifacts") if p.exists()]
    if not db.exists():  # to be created: the nearest folder that exists must take it
        existing.append(next(p for p in (db.parent, *db.parent.parents) if p.exists()))
    for path in existing:
        if not os.access(path, os.W_OK):
            raise StoreError(f"{url}: {path} is read-only; point logger.uri (or MLFLOW_TRACKING_URI, or "
                             f"hydra.sweeper.storage) at a store you can write, or run with logger=none")


@contextlib.contextmanager
def store_lock(url: str) -> Iterator[None]:
    """Hold a lock shared by every process on this machine that opens the same sqlite store (a file beside
    the database), so that one of them creates its tables while the others wait; a no-op for servers,
    which serialise their own writes."""
    db = sqlite_file(url)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        yield


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """For an http(s) tracking URI, one request to MLflow's REST API; StoreError if nothing answers within
    `timeout_s` (MLflow's own client retries for minutes before it gives up), or if what answers is not an
    MLflow tracking server (a server that asks for credentials is left to MLflow's client, which has them)."""
    if not uri.startswith(("http://", "https://")):
        return
    api = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(api, timeout=timeout_s) as answer:
            json.loads(answer.read())
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return
        raise StoreError(f"{uri} answers, but not as an MLflow tracking server (HTTP {err.code} for its "
                         f"REST API): point MLFLOW_TRACKING_URI or logger.uri at one") from None
    except ValueError:  # UnicodeDecodeError, JSONDecodeError
        raise StoreError(f"{uri} answers, but not as an MLflow tracking server (its REST API's answer is not "
                         f"JSON): point MLFLOW_TRACKING_URI or logger.uri at one") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StoreError(f"MLflow tracking server {uri} does not answer ({reason}): start it, or point "
                         f"MLFLOW_TRACKING_URI or logger.uri at another store") from None
