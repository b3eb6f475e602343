"""The model zoo; each model is picked in configs by `model=NAME` (conf/model/NAME.yaml)."""

from cfae.models.autorec import AutoRec
from cfae.models.base import RatingModel
from cfae.models.baselines import ImputedSVD, MatrixFactorization
from cfae.models.deep import DeepAutoencoder
from cfae.models.kernel import GLocalK, KernelAutoRec
from cfae.models.vae import VAE

__all__ = ["VAE", "AutoRec", "DeepAutoencoder", "GLocalK", "ImputedSVD", "KernelAutoRec", "MatrixFactorization",
           "RatingModel"]
