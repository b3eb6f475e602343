"""The code of a saved cfae model as MLflow serves it (MLflow's "models from code": the model is this file
and cfae's package beside it, not a pickled object; cfae/serving.py writes it)."""

import mlflow.models

from cfae.serving import RecommenderModel

mlflow.models.set_model(RecommenderModel())
