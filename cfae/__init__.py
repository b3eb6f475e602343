"""cfae: autoencoders for collaborative filtering."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _layers(hidden: int | None, depth: int | None, *default: int) -> list[int]:
    """Encoder layer sizes from the sweep knobs: `depth` layers of width `hidden`; the model's own list
    (`default`, the study's row) when neither knob is set."""
    if hidden is None and depth is None:
        return list(default)
    return [hidden if hidden is not None else default[-1]] * (depth if depth is not None else len(default))


# `${or:${noise},0.2}`: a knob's value, or the model's default while the knob is null.
OmegaConf.register_new_resolver("or", lambda value, default: default if value is None else value, replace=True)
OmegaConf.register_new_resolver("layers", _layers, replace=True)
