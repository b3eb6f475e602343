"""A trained model you can ask: top-k items for a user, predicted ratings for (user, item) pairs, in the data's
original ids (numbers or text), with titles where the data has them (a MovieLens release's movie file).

    rec = cfae.load("<MLflow run id>")        # or a saved folder, or runs:/<run id>/recommender
    rec.recommend(42, k=10)                   # [Recommendation(rank, item_id, title, rating), ...]
    rec.predict([42, 42], [1, 3114])          # predicted ratings

A `Recommender` is the model with what it needs to answer: its input ratings (the training and validation
parts, as the test saw them, in the model's orientation), the original id of each user and item, and the
titles. `fit` saves one in each run's output folder and MLflow artifacts, inside the run's MLflow pyfunc
model (`model/artifacts/recommender/`, cfae/serving.py).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch

from cfae.checks import UsageError
from cfae.console import quiet
from cfae.sparse import SparseRows

ARTIFACT = "recommender"  # its folder name under a run's output folder and its MLflow artifacts


class UnknownId(UsageError, KeyError):
    """A user or item id the model's data does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_k(k) -> None:
    """How many items to recommend: an integer >= 1, else refused in one line."""
    if not (isinstance(k, int | np.integer) and not isinstance(k, bool) and k >= 1):
        raise UsageError(f"k={k}: must be an integer >= 1 (how many items to recommend)")


class Recommendation(NamedTuple):
    rank: int
    item_id: int | str
    title: str
    rating: float  # predicted, on the rating scale


class Recommender:
    def __init__(self, model: L.LightningModule, inputs: sp.csr_matrix, orientation: str, user_ids: np.ndarray,
                 item_ids: np.ndarray, titles: dict[int, str] | None = None):
        self.model = model.eval()
        self.inputs = inputs.tocsr()  # (n_rows, n_cols): users x items, or items x users
        self.orientation = orientation
        self.user_ids, self.item_ids = np.asarray(user_ids), np.asarray(item_ids)
        self.titles = titles or {}
        self.user_index = {u: i for i, u in enumerate(self.user_ids.tolist())}  # original id -> row or column
        self.item_index = {m: i for i, m in enumerate(self.item_ids.tolist())}
        self.rating_min, self.rating_max = model.rating_range

    @classmethod
    def from_fit(cls, model: L.LightningModule, datamodule) -> Recommender:
        """The fitted model with its DataModule's training + validation ratings, ids and titles."""
        return cls(model, datamodule.test_inputs, datamodule.orientation, datamodule.user_ids,
                   datamodule.item_ids, datamodule.titles)

    # -- answering --------------------------------------------------------------------------------------
    def user_ratings(self) -> sp.csr_matrix:
        """(n_users, n_items) the model's input ratings."""
        return self.inputs if self.orientation == "user" else self.inputs.T.tocsr()

    @torch.no_grad()
    def _predict_cells(self, users: np.ndarray, items: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """Predicted ratings at (user index, item index) pairs, clipped to the scale as the metric clips them."""
        rows, cols = (users, items) if self.orientation == "user" else (items, users)
        order = np.lexsort((cols, rows))  # cells sorted by row then column: each chunk of rows is one slice
        sorted_rows = rows[order]
        out = np.empty(len(rows), dtype=np.float32)
        unique_rows = np.unique(rows)
        if getattr(self.model, "whole_matrix", False):  # it reads every row at once
            unique_rows, chunk = np.arange(self.inputs.shape[0]), self.inputs.shape[0]
        for start in range(0, len(unique_rows), chunk):
            batch_rows = unique_rows[start:start + chunk]
            pick = order[np.searchsorted(sorted_rows, batch_rows[0]):
                         np.searchsorted(sorted_rows, batch_rows[-1], side="right")]
            position = np.searchsorted(batch_rows, rows[pick])
            crow = np.zeros(len(batch_rows) + 1, dtype=np.int64)
            np.cumsum(np.bincount(position, minlength=len(batch_rows)), out=crow[1:])
            at = SparseRows(torch.as_tensor(batch_rows), torch.from_numpy(crow), torch.as_tensor(cols[pick]),
                            torch.zeros(len(pick)), self.inputs.shape[1]).to(self.model.device)
            x = SparseRows.from_csr(self.inputs, batch_rows).to(self.model.device)
            out[pick] = self.model.predict_at(x, at).float().cpu().numpy()
        return np.clip(out, self.rating_min, self.rating_max)

    @torch.no_grad()
    def _block(self, rows: np.ndarray, cols: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """(len(rows), len(cols)) predicted ratings at every (row, column) of the model's matrix, clipped to
        the scale: one product per chunk of rows, only at the columns asked for."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        if getattr(self.model, "whole_matrix", False):  # it reads every row at once, in order
            every = self._block_rows(np.arange(self.inputs.shape[0]), cols)
            return np.clip(every[rows], self.rating_min, self.rating_max)
        out = np.empty((len(rows), len(cols)), dtype=np.float32)
        for start in range(0, len(rows), chunk):
            out[start:start + chunk] = self._block_rows(rows[start:start + chunk], cols)
        return np.clip(out, self.rating_min, self.rating_max)

    def _block_rows(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        n = len(rows)
        at = SparseRows(torch.as_tensor(rows), torch.arange(n + 1, dtype=torch.int64) * len(cols),
                        torch.as_tensor(np.tile(cols, n)), torch.zeros(n * len(cols)), self.inputs.shape[1])
        x = SparseRows.from_csr(self.inputs, rows).to(self.model.device)
        return self.model.predict_at(x, at.to(self.model.device)).float().cpu().numpy().reshape(n, len(cols))

    def user_scores(self, users: np.ndarray) -> np.ndarray:
        """(len(users), n_items) predicted ratings of every item for users given by index, in the model's
        item order."""
        items = np.arange(len(self.item_ids))
        if self.orientation == "user":
            return self._block(users, items)
        order = np.unique(users, return_inverse=True)  # each user's column once
        return self._block(items, order[0]).T[order[1]]

    def scores(self, user_id: int) -> np.ndarray:
        """(n_items,) predicted ratings of every item for one user, in the model's item order."""
        return self.user_scores(np.array([self._user(user_id)]))[0]

    def recommend(self, user_id: int, k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        """The k items with the highest predicted ratings for `user_id`, best first; by default none the
        user has rated. A user the data does not hold gets the popular, well-rated fallback (`popular`)."""
        return self.recommend_many([user_id], k, exclude_seen)[0]

    def recommend_many(self, user_ids, k: int = 10, exclude_seen: bool = True) -> list[list[Recommendation]]:
        """`recommend` for each of `user_ids`, the known users scored together in one batched product."""
        check_k(k)
        ids = [self.as_id(u, "user") for u in np.atleast_1d(np.asarray(user_ids, dtype=object))]
        known = [i for i, u in enumerate(ids) if u in self.user_index]
        fallback = self.popular(k) if len(known) < len(ids) else []
        lists = [[] if u in self.user_index else fallback for u in ids]
        if not known:
            return lists
        users = np.array([self.user_index[ids[i]] for i in known])
        scores = self.user_scores(users).astype(np.float64)  # (users, n_items)
        if exclude_seen:
            seen = self.user_ratings()[users]
            scores[np.repeat(np.arange(len(users)), np.diff(seen.indptr)), seen.indices] = -np.inf
        k = min(k, scores.shape[1])
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]  # (users,) each user's k-th highest score
        r, c = np.nonzero(scores >= kth[:, None])  # the top k and whatever ties with the k-th
        order = np.lexsort((c, -scores[r, c], r))  # by user, best first, ties in item order (a stable sort's)
        r, c = r[order], c[order]
        rank = np.arange(len(r)) - np.searchsorted(r, np.arange(len(users)))[r]
        keep = (rank < k) & np.isfinite(scores[r, c])  # fewer than k where fewer are unrated
        for row, j, at in zip(r[keep], c[keep], rank[keep]):
            lists[known[row]].append(self._entry(int(at) + 1, j, scores[row, j]))
        return lists

    @torch.no_grad()
    def recommend_for(self, items, k: int = 10, ratings=None) -> list[Recommendation]:
        """The top k for a user the model has not seen, given by the items they clicked (or rated: `ratings`,
        one per item): their row is built from those items and scored, the items given left out. The point
        of the held-out users' protocol; it needs a model whose rows are users and that has no per-user
        parameters (an autoencoder with user rows, any task=ranking model)."""
        check_k(k)
        if self.orientation != "user" or "n_rows" in inspect.signature(type(self.model)).parameters:
            raise UsageError(f"{type(self.model).__name__} with {self.orientation} rows cannot score a user it has "
                             f"not seen from their items; a model with user rows and no per-user parameters can")
        given = np.array([self._item(i) for i in np.atleast_1d(np.asarray(items, dtype=object))], dtype=np.int64)
        values = np.ones(len(given)) if ratings is None else np.asarray(ratings, dtype=np.float64)
        if len(values) != len(given) or len(set(given.tolist())) != len(given):
            raise UsageError(f"{len(given)} items and {len(values)} ratings: give each item once, with one rating")
        order = np.argsort(given)
        x = SparseRows(torch.zeros(1, dtype=torch.int64), torch.tensor([0, len(given)]),
                       torch.as_tensor(given[order]), torch.as_tensor(values[order], dtype=torch.float32),
                       self.inputs.shape[1]).to(self.model.device)
        scores = np.clip(self.model(x).float().cpu().numpy()[0].astype(np.float64), self.rating_min, self.rating_max)
        scores[given] = -np.inf
        top = np.argsort(-scores, kind="stable")[:min(k, len(scores) - len(given))]
        return [self._entry(rank, j, scores[j]) for rank, j in enumerate(top, 1)]

    def popular(self, k: int) -> list[Recommendation]:
        """The k items with the most good ratings (in the top quarter of the scale: 4 or more on 1..5), their
        mean rating as `rating`: what a user the data does not hold gets."""
        ratings = self.user_ratings()
        good_from = self.rating_min + 0.75 * (self.rating_max - self.rating_min)  # NaN for scores: every click
        good = (ratings >= good_from if np.isfinite(good_from) else ratings > 0).astype(np.float32).sum(axis=0).A1
        counts = ratings.getnnz(axis=0)
        means = np.divide(ratings.sum(axis=0).A1, counts, out=np.zeros(ratings.shape[1]), where=counts > 0)
        return [self._entry(rank, i, means[i]) for rank, i in enumerate(np.argsort(-good, kind="stable")[:k], 1)]

    def predict(self, user_ids, item_ids) -> np.ndarray:
        """Predicted ratings for pairs (user_ids[i], item_ids[i]) of original ids."""
        users = np.array([self._user(u) for u in np.atleast_1d(user_ids)], dtype=np.int64)
        items = np.array([self._item(m) for m in np.atleast_1d(item_ids)], dtype=np.int64)
        if len(users) != len(items):
            raise UsageError(f"{len(users)} user ids and {len(items)} item ids: give one of each per pair")
        return self._predict_cells(users, items)

    def as_id(self, value, what: str) -> int | str:
        """An original user or item id (`what`) as the index maps hold it. Where the data's ids are numbers: 42
        for 42, 42.0 or "42", and anything that is not a whole number refused in one line, not rounded; where
        they are text: the text (42 asks for "42")."""
        ids = self.user_ids if what == "user" else self.item_ids
        if ids.dtype.kind in "US":
            if isinstance(value, str | int | np.integer) and not isinstance(value, bool):
                return str(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        elif isinstance(value, int | np.integer | float | np.floating) and not isinstance(value, bool) and \
                float(value).is_integer():
            return int(value)
        kind = "text" if ids.dtype.kind in "US" else "whole numbers"
        raise UsageError(f"{what} id {value!r}: not an id of this model's data (its ids are {kind})")

    def _user(self, user_id) -> int:
        user_id = self.as_id(user_id, "user")
        if user_id not in self.user_index:
            raise UnknownId(f"user {user_id} is not in the model's data ({len(self.user_ids)} users)")
        return self.user_index[user_id]

    def _item(self, item_id) -> int:
        item_id = self.as_id(item_id, "item")
        if item_id not in self.item_index:
            raise UnknownId(f"item {item_id} is not in the model's data ({len(self.item_ids)} items; items with "
                            f"too few ratings were dropped before training)")
        return self.item_index[item_id]

    def _entry(self, rank: int, item: int, rating: float) -> Recommendation:
        item_id = self.item_ids[item].item()  # a Python int or str
        return Recommendation(rank, item_id, self.titles.get(item_id, ""), round(float(rating), 4))

    # -- saving and loading -----------------------------------------------------------------------------
    def save(self, folder: str | Path, checkpoint: str | Path) -> Path:
        """Write `folder/`: the model's checkpoint (weights and constructor arguments), its input ratings,
        ids and titles, and a manifest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, folder / "model.ckpt")
        m = self.inputs
        np.savez(folder / "data.npz", data=m.data, indices=m.indices, indptr=m.indptr, shape=np.array(m.shape),
                 user_ids=self.user_ids, item_ids=self.item_ids,
                 title_ids=np.array(list(self.titles), dtype=np.int64), titles=np.array(list(self.titles.values())))
        manifest = {"model": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                    "orientation": self.orientation}
        (folder / "recommender.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return folder

    @classmethod
    def load_folder(cls, folder: str | Path, map_location: str = "cpu", checkpoint: str | Path | None = None
                    ) -> Recommender:
        """The saved model of `folder`, with the weights of `checkpoint` instead of its own if given."""
        folder = Path(folder)
        manifest_path = folder / "recommender.json"
        if not manifest_path.is_file():
            raise UsageError(f"{folder}: not a saved cfae model (no recommender.json)")
        manifest = json.loads(manifest_path.read_text())
        model = model_class(manifest["model"], manifest_path).load_from_checkpoint(
            checkpoint or folder / "model.ckpt", map_location=map_location, weights_only=True)
        with np.load(folder / "data.npz") as d:
            inputs = sp.csr_matrix((d["data"], d["indices"], d["indptr"]), shape=tuple(d["shape"]))
            titles = dict(zip(d["title_ids"].tolist(), d["titles"].tolist()))
            return cls(model, inputs, manifest["orientation"], d["user_ids"], d["item_ids"], titles)


def model_class(name: str, manifest: Path) -> type:
    """The cfae model class a saved model's manifest names; anything else is refused, not imported."""
    from cfae.models import RankingModel, RatingModel

    module, _, qualname = str(name).rpartition(".")
    cls = getattr(importlib.import_module(module), qualname, None) if module.startswith("cfae.models.") else None
    if not (isinstance(cls, type) and issubclass(cls, RatingModel | RankingModel)):
        raise UsageError(f"{manifest}: model={name!r} is not one of cfae's models")
    return cls


@quiet()  # MLflow's download bars and the libraries' chatter, for the call only
def load(source: str | Path, tracking_uri: str | None = None) -> Recommender:
    """A saved model from a folder (`<output_dir>/recommender`, or a run's output folder), a checkpoint of a
    run (`<output_dir>/checkpoints/*.ckpt`, with its run's saved data), an MLflow run id, or a
    `runs:/<run id>[/recommender]` URI (from `tracking_uri`, else $MLFLOW_TRACKING_URI or
    sqlite:///mlruns/mlflow.db)."""
    text = str(source)
    path = Path(text)
    if path.is_file() and path.suffix == ".ckpt":  # <output_dir>/checkpoints/x.ckpt: its run's saved data
        return Recommender.load_folder(saved_folder(path.resolve().parent.parent), checkpoint=path)
    if path.is_dir():
        return Recommender.load_folder(saved_folder(path))
    _, local = run_files(text, f"model/artifacts/{ARTIFACT}", tracking_uri)  # the recommender's files only
    return Recommender.load_folder(local)


def run_files(source: str, artifact: str, tracking_uri: str | None = None) -> tuple[str, Path]:
    """(run id, a local copy of the run's `artifact`) for a run named by its id, a `runs:/<id>` URI or a
    registered model's `models:/<name>/<version>`, `models:/<name>/latest` or `models:/<name>@<alias>` (in the
    store `tracking_uri`, else $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)."""
    match = re.fullmatch(r"(?:runs:/)?([0-9a-f]{32})(?:/.*)?|models:/([^/@]+)(?:/(\w+)|@(\w+))", source)
    if not match:
        raise UsageError(f"{source}: neither a folder, a checkpoint, an MLflow run id nor a runs:/ or models:/ URI")
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from cfae.stores import check_server
    from cfae.tracking import tracking_uri as store_uri

    uri = store_uri(tracking_uri)
    check_server(uri)
    try:
        run_id = match[1]
        if run_id is None:  # a registered model's version, in this store
            client = MlflowClient(uri, registry_uri=uri)
            name, version, alias = match[2], match[3], match[4]
            if alias:
                run_id = client.get_model_version_by_alias(name, alias).run_id
            elif version == "latest":
                versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"])
                if not versions:
                    raise UsageError(f"{source}: the registered model {name} has no version in {uri}")
                run_id = versions[0].run_id
            else:
                run_id = client.get_model_version(name, version).run_id
        local = download_artifacts(run_id=run_id, artifact_path=artifact, tracking_uri=uri)
    except (MlflowException, OSError) as err:
        raise UsageError(f"{source} in {uri}: no {artifact} ({str(err).splitlines()[0]}); a run with "
                         f"save_model=false (a study's, by default) packaged none: run it with "
                         f"save_model=true") from None
    return run_id, Path(local)


def saved_folder(path: Path) -> Path:
    """The saved recommender in `path`: itself, a pyfunc model's copy, or a run output folder's."""
    for folder in (path, path / "artifacts" / ARTIFACT, path / "model" / "artifacts" / ARTIFACT):
        if (folder / "recommender.json").is_file():
            return folder
    raise UsageError(f"{path}: no saved cfae model there (a finished run's output folder has one in "
                     f"model/artifacts/{ARTIFACT}/)")
