from cfae.models.autorec import AutoRec
from cfae.models.base import RatingAutoencoder

__all__ = ["AutoRec", "RatingAutoencoder"]
