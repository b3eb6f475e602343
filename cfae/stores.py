"""The databases that hold runs (MLflow) and studies (Optuna): safe to create from several processes at
once, and a server that does not answer is said at once instead of after minutes of retries."""

from __future__ import annotations

import contextlib
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
    """For an http(s) tracking URI, one request to the server's health endpoint; StoreError if it does not
    answer within `timeout_s` (MLflow's own client retries for minutes before it gives up)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:  # it answered: a server, perhaps behind a proxy without /health
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StoreError(f"MLflow tracking server {uri} does not answer ({reason}): start it, or point "
                         f"MLFLOW_TRACKING_URI or logger.uri at another store") from None
