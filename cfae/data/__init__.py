"""Data: MovieLens files (`movielens`), the study's splits (`splits`), row and column means with the
fallback predictions built from them (`means`), and the DataModule serving sparse rows (`module`)."""

__all__ = ["MovieLensDataModule"]


def __getattr__(name: str):
    """`cfae.data.MovieLensDataModule`, imported when first used: a model that needs `means` does not load
    the DataModule, the downloader and Lightning's data machinery with it."""
    if name == "MovieLensDataModule":
        from cfae.data.module import MovieLensDataModule

        return MovieLensDataModule
    raise AttributeError(f"module 'cfae.data' has no attribute {name!r}")
