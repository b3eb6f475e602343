"""cfae: autoencoders for collaborative filtering."""

__version__ = "0.1.0"
