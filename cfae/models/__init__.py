"""The model zoo; each model is picked in configs by `model=NAME` (conf/model/NAME.yaml). RatingModel's
predict ratings (task=rating), RankingModel's rank items from clicks (task=ranking)."""

from cfae.models.autorec import AutoRec
from cfae.models.base import RatingModel
from cfae.models.baselines import ImputedSVD, MatrixFactorization
from cfae.models.deep import DeepAutoencoder
from cfae.models.ease import EASE, Popularity
from cfae.models.fm import BayesianFM
from cfae.models.kernel import GLocalK, KernelAutoRec
from cfae.models.mult import MultDAE, MultVAE
from cfae.models.ranking import RankingModel
from cfae.models.recvae import RecVAE
from cfae.models.vae import VAE

__all__ = ["EASE", "VAE", "AutoRec", "BayesianFM", "DeepAutoencoder", "GLocalK", "ImputedSVD", "KernelAutoRec",
           "MatrixFactorization", "MultDAE", "MultVAE", "Popularity", "RankingModel", "RatingModel", "RecVAE"]
