"""Data: MovieLens files (`movielens`), the study's splits (`splits`), row and column means with the
fallback predictions built from them (`means`), and the DataModule serving sparse rows (`module`)."""

from cfae.data.module import MovieLensDataModule

__all__ = ["MovieLensDataModule"]
