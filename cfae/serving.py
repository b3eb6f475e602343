"""A saved model as an MLflow pyfunc model: what `mlflow models serve`, `mlflow.pyfunc.load_model` and the
model registry take.

    mlflow models serve -m runs:/<run id>/model --env-manager local -p 5001
    curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"user_id": 42}], "params": {"k": 10}}'             # top 10 for user 42
    curl ... -d '{"dataframe_records": [{"user_id": 42, "movie_id": 1}]}'                 # a predicted rating

A request is a table of `user_id`s, with a `movie_id` column for predicted ratings of (user, movie) pairs;
without one, each user gets a top-k list (`params`: `k`, default 10, and `exclude_seen`, default true).
The answer is a table with columns user_id, rank, movie_id, title, rating (rank 0 for a pair's rating).
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import cfae
from cfae.recommender import ARTIFACT, Recommender

MODEL = "model"  # its folder under a run's output folder and its MLflow artifacts
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "movie_id", required=False)]),
    outputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "rank"), ColSpec("long", "movie_id"),
                    ColSpec("string", "title"), ColSpec("double", "rating")]),
    params=ParamSchema([ParamSpec("k", "long", 10), ParamSpec("exclude_seen", "boolean", True)]),
)
REQUIREMENTS = ("torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy", "scipy", "pandas", "mlflow")


class RecommenderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.recommender = Recommender.load_folder(context.artifacts[ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return answer(self.recommender, model_input, **(params or {}))


def answer(rec: Recommender, requests: pd.DataFrame, k: int = 10, exclude_seen: bool = True) -> pd.DataFrame:
    """Top-k lists, or predicted ratings where a request names a movie."""
    rows = []
    has_movie = "movie_id" in requests and requests["movie_id"].notna()
    pairs = requests[has_movie] if "movie_id" in requests else requests.iloc[:0]
    if len(pairs):
        ratings = rec.predict(pairs["user_id"].to_numpy(), pairs["movie_id"].to_numpy())
        for user, movie, rating in zip(pairs["user_id"], pairs["movie_id"], ratings):
            rows.append((int(user), 0, int(movie), rec.titles.get(int(movie), ""), float(rating)))
    for user in requests.loc[~has_movie if "movie_id" in requests else slice(None), "user_id"]:
        rows += [(int(user), r.rank, r.movie_id, r.title, r.rating)
                 for r in rec.recommend(int(user), int(k), bool(exclude_seen))]
    return pd.DataFrame(rows, columns=["user_id", "rank", "movie_id", "title", "rating"])


def save(rec: Recommender, recommender_folder: str | Path, path: str | Path) -> Path:
    """Write the pyfunc model to `path`, holding the saved recommender folder and cfae's own code."""
    example_user = int(rec.user_ids[0])
    shutil.rmtree(path, ignore_errors=True)  # a run's folder is its own (train.claimed): a re-run replaces it
    mlflow.pyfunc.save_model(
        path, python_model=RecommenderModel(), artifacts={ARTIFACT: str(recommender_folder)},
        code_paths=[str(Path(cfae.__file__).parent)], signature=SIGNATURE,
        input_example=pd.DataFrame({"user_id": np.array([example_user], dtype=np.int64)}),
        pip_requirements=[f"{name}=={metadata.version(name)}" for name in REQUIREMENTS])
    return Path(path)
