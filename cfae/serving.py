"""A saved model as an MLflow pyfunc model: what `mlflow models serve`, `mlflow.pyfunc.load_model` and the
model registry take.

    mlflow models serve -m runs:/<run id>/model --env-manager local -p 5001
    curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"user_id": 42}], "params": {"k": 10}}'             # top 10 for user 42
    curl ... -d '{"dataframe_records": [{"user_id": 42, "item_id": 1}]}'                  # a predicted rating
    curl ... -d '{"dataframe_records": [{"user_id": "new", "items": [1, 50, 260]}]}'      # a new user's top 10

A request is a table of `user_id`s, with an `item_id` column for predicted ratings of (user, item) pairs;
without one, each user gets a top-k list (`params`: `k`, default 10, and `exclude_seen`, default true). A user
the model has not seen can be given by their items, an `items` column of lists (`{"user_id": "new", "items":
[1, 50, 260]}`), and is scored from them. Ids are the data's own, numbers or text. The answer is a table with
columns user_id, rank, item_id, title, rating (rank 0 for a pair's rating; a score where the model ranks).
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

import cfae
from cfae.checks import UsageError
from cfae.recommender import ARTIFACT, Recommender

MODEL = "model"  # its folder under a run's output folder and its MLflow artifacts
CODE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc model, as code (MLflow's models from code)
SIGNATURE = ModelSignature(
    # ids as the client sends them, numbers or text: a "long" column would have the server truncate 42.7 to
    # 42 before the model could refuse it, a "string" one would refuse Python's integers
    inputs=Schema([ColSpec(AnyType(), "user_id"), ColSpec(AnyType(), "item_id", required=False),
                   ColSpec(AnyType(), "items", required=False)]),
    outputs=Schema([ColSpec(AnyType(), "user_id"), ColSpec("long", "rank"), ColSpec(AnyType(), "item_id"),
                    ColSpec("string", "title"), ColSpec("double", "rating")]),
    params=ParamSchema([ParamSpec("k", "long", 10), ParamSpec("exclude_seen", "boolean", True)]),
)
REQUIREMENTS = ("torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy", "scipy", "pandas", "mlflow")


class RequestError(MlflowException):
    """A request the model refuses, answered with HTTP 400 and cfae's own one-line message.

    MLflow's scoring server prefixes the message of an MlflowException that `predict` raises with the whole
    request ("Failed to predict data '<the table>'. Error: ..."), by assigning the exception's `message`; this
    one keeps the message it was made with. A seam on the server's handling: tests/test_recommender.py sends
    bad requests to a real `mlflow models serve` and fails if the answer changes."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


class RecommenderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.recommender = Recommender.load_folder(context.artifacts[ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            return answer(self.recommender, model_input, **(params or {}))
        except UsageError as err:
            raise RequestError(str(err)) from None


def answer(rec: Recommender, requests: pd.DataFrame, k: int = 10, exclude_seen: bool = True) -> pd.DataFrame:
    """Top-k lists, or predicted ratings where a request names an item; the users' lists come from one batched
    product."""
    none = pd.Series(False, index=requests.index)
    has_item = requests["item_id"].notna() if "item_id" in requests else none
    given = requests["items"].map(lambda v: v is not None and not (isinstance(v, float) and np.isnan(v))) \
        if "items" in requests else none
    pairs, users = requests[has_item], requests.loc[~has_item & ~given, "user_id"].to_numpy()
    rows = []
    for _, request in requests[given].iterrows():  # users the model has not seen, given by their items
        rows += [(request["user_id"], *r) for r in rec.recommend_for(list(request["items"]), int(k))]
    if len(pairs):
        ratings = rec.predict(pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
        for user, item, rating in zip(pairs["user_id"], pairs["item_id"], ratings):
            item = rec.as_id(item, "item")
            rows.append((rec.as_id(user, "user"), 0, item, rec.titles.get(item, ""), float(rating)))
    if len(users):
        top_lists = rec.recommend_many(users, k, bool(exclude_seen))
        rows += [(rec.as_id(user, "user"), *r) for user, top in zip(users, top_lists) for r in top]
    return pd.DataFrame(rows, columns=[c.name for c in SIGNATURE.outputs.inputs])


def save(rec: Recommender, recommender_folder: str | Path, path: str | Path) -> Path:
    """Write the pyfunc model to `path`, holding the saved recommender folder and cfae's own code."""
    example_user = rec.user_ids[0].item()
    shutil.rmtree(path, ignore_errors=True)  # a run's folder is its own (train.claimed): a re-run replaces it
    mlflow.pyfunc.save_model(
        path, python_model=str(CODE), artifacts={ARTIFACT: str(recommender_folder)},
        code_paths=[str(Path(cfae.__file__).parent)], signature=SIGNATURE,
        input_example=pd.DataFrame({"user_id": [example_user]}),
        pip_requirements=[f"{name}=={metadata.version(name)}" for name in REQUIREMENTS])
    return Path(path)
