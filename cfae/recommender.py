"""A trained model you can ask: top-k movies for a user, predicted ratings for (user, movie) pairs, in the
original MovieLens ids, with titles when the release's movie file was there.

    rec = cfae.load("<MLflow run id>")        # or a saved folder, or runs:/<run id>/recommender
    rec.recommend(42, k=10)                   # [Recommendation(rank, movie_id, title, rating), ...]
    rec.predict([42, 42], [1, 3114])          # predicted ratings

A `Recommender` is the model with what it needs to answer: its input ratings (the training and validation
parts, as the test saw them, in the model's orientation), the original id of each user and movie, and the
titles. `fit` saves one in each run's output folder and MLflow artifacts, inside the run's MLflow pyfunc
model (`model/artifacts/recommender/`, cfae/serving.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from hydra.utils import get_class

from cfae.checks import UsageError
from cfae.sparse import SparseRows

ARTIFACT = "recommender"  # its folder name under a run's output folder and its MLflow artifacts


class UnknownId(UsageError, KeyError):
    """A user or movie id the model's data does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Recommendation(NamedTuple):
    rank: int
    movie_id: int
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
        self.user_index = {int(u): i for i, u in enumerate(self.user_ids)}
        self.item_index = {int(m): i for i, m in enumerate(self.item_ids)}
        self.rating_min, self.rating_max = model.val_rmse.rating_min, model.val_rmse.rating_max

    @classmethod
    def from_fit(cls, model: L.LightningModule, datamodule) -> Recommender:
        """The fitted model with its DataModule's training + validation ratings, ids and titles."""
        return cls(model, datamodule.train_val_matrix, datamodule.orientation, datamodule.user_ids,
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

    def scores(self, user_id: int) -> np.ndarray:
        """(n_items,) predicted ratings of every movie for one user, in the model's item order."""
        u = self._user(user_id)
        return self._predict_cells(np.full(len(self.item_ids), u), np.arange(len(self.item_ids)))

    def recommend(self, user_id: int, k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        """The k movies with the highest predicted ratings for `user_id`, best first; by default none the
        user has rated. A user the data does not hold gets the movies with the most ratings of 4 or more
        (their mean rating as `rating`): the popular, well-rated fallback."""
        ratings = self.user_ratings()
        if int(user_id) not in self.user_index:
            good = (ratings >= 4).astype(np.float32).sum(axis=0).A1  # (n_items,) ratings of 4 or more
            means = np.divide(ratings.sum(axis=0).A1, ratings.getnnz(axis=0), out=np.zeros(ratings.shape[1]),
                              where=ratings.getnnz(axis=0) > 0)
            top = np.argsort(-good, kind="stable")[:k]
            return [self._entry(rank, i, means[i]) for rank, i in enumerate(top, 1)]
        scores = self.scores(user_id).astype(np.float64)
        if exclude_seen:
            scores[ratings[self.user_index[int(user_id)]].indices] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argsort(-scores, kind="stable")[:k]
        return [self._entry(rank, i, scores[i]) for rank, i in enumerate(top, 1)]

    def predict(self, user_ids, item_ids) -> np.ndarray:
        """Predicted ratings for pairs (user_ids[i], item_ids[i]) of original ids."""
        users = np.array([self._user(u) for u in np.atleast_1d(user_ids)], dtype=np.int64)
        items = np.array([self._item(m) for m in np.atleast_1d(item_ids)], dtype=np.int64)
        if len(users) != len(items):
            raise UsageError(f"{len(users)} user ids and {len(items)} movie ids: give one of each per pair")
        return self._predict_cells(users, items)

    def _user(self, user_id) -> int:
        if int(user_id) not in self.user_index:
            raise UnknownId(f"user {user_id} is not in the model's data ({len(self.user_ids)} users, ids "
                            f"{self.user_ids.min()} to {self.user_ids.max()})")
        return self.user_index[int(user_id)]

    def _item(self, movie_id) -> int:
        if int(movie_id) not in self.item_index:
            raise UnknownId(f"movie {movie_id} is not in the model's data ({len(self.item_ids)} movies; movies "
                            f"with too few ratings were dropped before training)")
        return self.item_index[int(movie_id)]

    def _entry(self, rank: int, item: int, rating: float) -> Recommendation:
        movie = int(self.item_ids[item])
        return Recommendation(rank, movie, self.titles.get(movie, ""), round(float(rating), 4))

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
        model = get_class(manifest["model"]).load_from_checkpoint(checkpoint or folder / "model.ckpt",
                                                                   map_location=map_location)
        with np.load(folder / "data.npz") as d:
            inputs = sp.csr_matrix((d["data"], d["indices"], d["indptr"]), shape=tuple(d["shape"]))
            titles = dict(zip(d["title_ids"].tolist(), d["titles"].tolist()))
            return cls(model, inputs, manifest["orientation"], d["user_ids"], d["item_ids"], titles)


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
    match = re.fullmatch(r"(?:runs:/)?([0-9a-f]{32})(?:/.*)?|models:/([^/@]+)(?:/(\w+)|@(\w+))", text)
    if not match:
        raise UsageError(f"{text}: neither a folder, a checkpoint, an MLflow run id nor a runs:/ or models:/ URI")
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from cfae.stores import check_server
    from cfae.tracking import tracking_uri as store_uri

    uri = store_uri(tracking_uri)
    check_server(uri)
    try:
        run_id = match[1]
        if run_id is None:  # models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>, in this store
            client = MlflowClient(uri, registry_uri=uri)
            name, version, alias = match[2], match[3], match[4]
            if alias:
                run_id = client.get_model_version_by_alias(name, alias).run_id
            elif version == "latest":
                versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"])
                if not versions:
                    raise UsageError(f"{text}: the registered model {name} has no version in {uri}")
                run_id = versions[0].run_id
            else:
                run_id = client.get_model_version(name, version).run_id
        # only the recommender's files, not the whole pyfunc model
        local = download_artifacts(run_id=run_id, artifact_path=f"model/artifacts/{ARTIFACT}", tracking_uri=uri)
    except (MlflowException, OSError) as err:
        raise UsageError(f"{text} in {uri}: no saved model ({str(err).splitlines()[0]})") from None
    return Recommender.load_folder(local)


def saved_folder(path: Path) -> Path:
    """The saved recommender in `path`: itself, a pyfunc model's copy, or a run output folder's."""
    for folder in (path, path / "artifacts" / ARTIFACT, path / "model" / "artifacts" / ARTIFACT):
        if (folder / "recommender.json").is_file():
            return folder
    raise UsageError(f"{path}: no saved cfae model there (a finished run's output folder has one in "
                     f"model/artifacts/{ARTIFACT}/)")
