"""Data: ratings and the matrix they make (`ratings`), read from MovieLens files (`movielens`) or a table of
your own (`tables`), split (`splits`), row and column means with the fallback predictions built from them
(`means`), and the DataModule serving sparse rows (`module`)."""

__all__ = ["RatingsDataModule"]


def __getattr__(name: str):
    """`cfae.data.RatingsDataModule`, imported when first used: a model that needs `means` does not load
    the DataModule, the downloader and Lightning's data machinery with it."""
    if name == "RatingsDataModule":
        from cfae.data.module import RatingsDataModule

        return RatingsDataModule
    raise AttributeError(f"module 'cfae.data' has no attribute {name!r}")
