"""cfae: autoencoders for collaborative filtering."""

import torch
from omegaconf import OmegaConf

__version__ = "0.1.0"
__all__ = ["Trained", "compose", "fit"]


def __getattr__(name: str):
    """`cfae.compose`, `cfae.fit` and `cfae.Trained`, imported when first used: `import cfae` stays light."""
    if name == "compose":
        from cfae.configs import compose

        return compose
    if name in ("fit", "Trained"):
        from cfae import train

        return getattr(train, name)
    raise AttributeError(f"module 'cfae' has no attribute {name!r}")


def _layers(hidden: int | None, depth: int | None, *default: int) -> list[int]:
    """Encoder layer sizes from the sweep knobs: `depth` layers of width `hidden`; the model's own list
    (`default`, the study's row) when neither knob is set."""
    if hidden is None and depth is None:
        return list(default)
    return [hidden if hidden is not None else default[-1]] * (depth if depth is not None else len(default))


def _precision(accelerator: str = "auto") -> str:
    """Lightning's `precision` for the hardware: bf16 mixed precision (weights, optimizer state and loss in
    float32, matrix products in bfloat16) where the chip multiplies bfloat16 natively (CUDA GPUs that
    support it, CPUs with AMX tiles), else float32. On a 2-core AMX CPU an ML-1M AutoRec epoch takes 0.33 s
    against 0.45 s in float32, at the same test RMSE to three decimals (docs/performance.md)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if accelerator in ("auto", "cpu") and torch.cpu._is_amx_tile_supported() else "32-true"


# `${or:${noise},0.2}`: a knob's value, or the model's default while the knob is null.
OmegaConf.register_new_resolver("or", lambda value, default: default if value is None else value, replace=True)
OmegaConf.register_new_resolver("layers", _layers, replace=True)
OmegaConf.register_new_resolver("precision", _precision, replace=True)
