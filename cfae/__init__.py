"""cfae: autoencoders for collaborative filtering.

    import cfae
    cfg = cfae.compose("model=vae", "data=ml100k")   # as `python train.py model=vae data=ml100k` would run
    trained = cfae.fit(cfg)                           # .model, .datamodule, .metrics, .run_id
    cfae.load(trained.run_id).recommend(42, k=10)     # a saved model's top 10 for user 42
    cfae.evaluate(trained.run_id, "data.split=temporal")   # the saved model tested on another split
"""

__version__ = "0.1.0"
__all__ = ["Trained", "compose", "evaluate", "fit", "load"]


def __getattr__(name: str):
    """`cfae.compose`, `cfae.fit`, `cfae.load`, `cfae.evaluate` and `cfae.Trained`, imported when first used:
    `import cfae` stays light."""
    if name == "compose":
        from cfae.configs import compose

        return compose
    if name == "load":
        from cfae.recommender import load

        return load
    if name == "evaluate":  # the module, which is callable: cfae.evaluate(run, "data.split=temporal")
        import importlib

        return importlib.import_module("cfae.evaluate")
    if name in ("fit", "Trained"):
        from cfae import train

        return getattr(train, name)
    raise AttributeError(f"module 'cfae' has no attribute {name!r}")
