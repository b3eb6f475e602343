"""Every user-facing value checked before data loads or a run is created, each refused in one line that
names the key, the value and what is allowed; and the one-line reporting of such errors at the command line.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import torch
from omegaconf import DictConfig, OmegaConf


class UsageError(Exception):
    """A mistake in what was asked (a value, a file, a store), said in one line: the command line prints it
    without a traceback and exits with status 1."""


class ConfigError(UsageError, ValueError):
    pass


class DataError(UsageError, ValueError):
    """Bad or missing input data; the message names the file (and line) at fault."""


class Diverged(UsageError, FloatingPointError):
    """Training blew up (a loss or RMSE far beyond any model that learns): most often a learning rate too
    high for the model."""


def is_number(x: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: Any) -> bool:
    """An int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


positive_int = (lambda x: is_int(x) and x >= 1, "an integer >= 1")
count = (lambda x: is_int(x) and x >= 0, "an integer >= 0")
positive = (lambda x: is_number(x) and x > 0, "a number > 0")
non_negative = (lambda x: is_number(x) and x >= 0, "a number >= 0")
fraction = (lambda x: is_number(x) and 0 <= x < 1, "a number >= 0 and < 1")
open_fraction = (lambda x: is_number(x) and 0 < x < 1, "a number > 0 and < 1")
layer_list = (lambda x: isinstance(x, list) and len(x) > 0 and all(is_int(v) and v >= 1 for v in x),
              "a non-empty list of integers >= 1")

# A model's and the data's bounds, stated once: their constructors annotate each argument (`hidden_size:
# PositiveInt = 500`), and the same annotation refuses a bad value up front, before data loads (`check_config`:
# model.hidden_size=0), and when the model or the DataModule is built from Python (`check_arguments`), in the
# same words.
PositiveInt = Annotated[int, positive_int]
Count = Annotated[int, count]
Positive = Annotated[float, positive]
NonNegative = Annotated[float, non_negative]
Fraction = Annotated[float, fraction]
Layers = Annotated[list[int], layer_list]
OpenFraction = Annotated[float, open_fraction]


def one_of(*allowed: str) -> tuple[Callable[[Any], bool], str]:
    """The bound of a setting that takes one of a few words: `Annotated[str, one_of("item", "user")]`."""
    return (lambda x: x in allowed, " or ".join(allowed) if len(allowed) < 3 else "one of " + ", ".join(allowed))

# (key, (test, what is allowed), why). Sweep knobs come first: a bad knob is named as the user typed it,
# not as the model key it feeds. Keys an optimizer does not have are skipped. The model's and the data's keys:
# their constructors' annotations (`bounds`), and the data's settings that depend on each other (data.fold and
# data.n_folds, a split and its data set) its constructor's checks, which `check_config` runs by building it.
RULES: list[tuple[str, tuple[Callable[[Any], bool], str], str]] = [
    ("hidden", positive_int, "the latent size; null: the model's default"),
    ("depth", positive_int, "the number of encoder layers; null: the model's default"),
    ("dropout", fraction, "a dropout rate; null: the model's default"),
    ("noise", fraction, "the fraction of input ratings dropped; null: the model's default"),
    ("seed", count, ""),
    ("threads", positive_int, "torch's CPU threads; null: the cores this process may use"),
    ("patience", positive_int, "epochs without a better val/rmse before early stopping"),
    ("refit", (lambda x: isinstance(x, bool), "true or false"), ""),
    ("save_model", (lambda x: isinstance(x, bool), "true or false"), ""),
    ("checkpoint_every_s", non_negative, "seconds between full checkpoints; 0: every epoch"),
    ("trainer.max_epochs", positive_int, ""),
    ("optimizer.lr", positive, "the learning rate"),
    ("optimizer.weight_decay", non_negative, ""),
    ("optimizer.momentum", non_negative, ""),
    ("ranking.k", (lambda x: positive_int[0](x) or (isinstance(x, list) and len(x) > 0 and
                                                   all(positive_int[0](v) for v in x)),
                   "an integer >= 1 or a list of them"), "the cut-offs of Recall@k and NDCG@k"),
]


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def bounds(cls: type) -> dict[str, tuple[Callable[[Any], bool], str]]:
    """The bounds the constructors of `cls` and its bases annotate their arguments with: {argument: (test, what
    is allowed)}."""
    found = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass) or klass.__module__.split(".")[0] != "cfae":
            continue
        for name, hint in get_type_hints(vars(klass)["__init__"], include_extras=True).items():
            for meta in getattr(hint, "__metadata__", ()):
                found[name] = meta
    return found


def check_arguments(cls: type, arguments: dict[str, Any], prefix: str = "model.") -> None:
    """Raise ConfigError for the first argument outside the bounds its constructor states (`bounds`)."""
    for name, (test, allowed) in bounds(cls).items():
        value = arguments.get(name)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        value = list(value) if isinstance(value, tuple) else value  # a default such as (200,)
        if value is not None and not test(value):
            raise ConfigError(f"{prefix}{name}={_show(value)}: must be {allowed}")


def _target(node: DictConfig, prefix: str) -> type:
    from hydra.utils import get_class

    try:
        return get_class(node._target_)
    except Exception as err:
        raise ConfigError(f"{prefix}_target_={node._target_}: {err}".splitlines()[0]) from None


def _check_model(model: Any) -> None:
    if not OmegaConf.is_config(model) or "_target_" not in model:
        return
    cls, arguments = _target(model, "model."), {}
    for name in bounds(cls):
        try:
            arguments[name] = OmegaConf.select(model, name, throw_on_missing=True)
        except Exception as err:  # an interpolation that cannot resolve, e.g. a resolver refusing a value
            raise ConfigError(f"model.{name}: {err}".splitlines()[0]) from None
    check_arguments(cls, arguments)


def _check_data(data: Any) -> None:
    """Build the DataModule of `data`, which reads nothing yet: its constructor refuses what it cannot run."""
    if not OmegaConf.is_config(data) or "_target_" not in data:
        return
    try:
        arguments = OmegaConf.to_container(data, resolve=True)
    except Exception as err:  # an interpolation that cannot resolve
        raise ConfigError(f"data: {err}".splitlines()[0]) from None
    _target(data, "data.")(**{k: v for k, v in arguments.items() if k != "_target_"})


def check_config(cfg: DictConfig, sweeping: bool = False) -> None:
    """Raise ConfigError for the first value in `cfg` that cfae cannot run with (`sweeping`: as the base of a
    sweep's trials)."""
    for key, (test, allowed), why in RULES:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception as err:  # an interpolation that cannot resolve, e.g. a resolver refusing a value
            raise ConfigError(f"{key}: {err}".splitlines()[0]) from None
        if OmegaConf.is_config(value):  # a list such as model.layer_sizes
            value = OmegaConf.to_container(value, resolve=True)
        if value is not None and not test(value):  # None: absent, or null for the model's default
            raise ConfigError(f"{key}={_show(value)}: must be {allowed}" + (f" ({why})" if why else ""))
    _check_knobs(cfg)
    _check_model(cfg.get("model"))
    if cfg.get("refit") and sweeping:
        raise ConfigError("refit=true in a sweep: trials are compared on validation, which refitting does not "
                          "change; refit the chosen configuration with train.py")
    _check_accelerator(OmegaConf.select(cfg, "trainer.accelerator"))
    _check_devices(OmegaConf.select(cfg, "trainer.devices"))
    resume = cfg.get("resume")
    if resume:
        if not Path(resume).is_file():
            raise ConfigError(f"resume={resume}: no such checkpoint (a run's full state is "
                              f"<its output dir>/checkpoints/last.ckpt)")
        if "optimizer_states" not in read_checkpoint(resume, f"resume={resume}"):
            raise ConfigError(f"resume={resume}: holds a model's weights only, not a run's training state; "
                              f"resume from <its output dir>/checkpoints/last.ckpt")
    root = OmegaConf.select(cfg, "data.root")
    if root and not Path(root).is_dir():
        raise ConfigError(f"data.root={root}: no such folder (set by CFAE_DATA_DIR or data.root)")
    _check_data(cfg.get("data"))


KNOBS = ("hidden", "depth", "dropout", "noise")


def knobs_used(model: DictConfig) -> list[str]:
    """The knobs a model config feeds (`hidden_size: ${hidden}`, `${layers:${hidden},${depth},...}`)."""
    text = str(OmegaConf.to_container(model, resolve=False))  # the model's keys, interpolations unresolved
    return [k for k in KNOBS if "${" + k + "}" in text]


def check_knob(cfg: DictConfig, knob: str, value: Any) -> None:
    """A knob that is set must feed the model: `dropout=0.3` on a model without code dropout is refused
    rather than ignored."""
    if knob in KNOBS and value is not None and OmegaConf.is_config(cfg.get("model")):
        used = knobs_used(cfg.model)
        if knob not in used:
            raise ConfigError(f"{knob}={_show(value)}: {cfg.model.get('_target_')} has no use for this knob; it "
                              f"takes {', '.join(used) or 'none'}")


def _check_knobs(cfg: DictConfig) -> None:
    for knob in KNOBS:
        check_knob(cfg, knob, cfg.get(knob))


def _check_accelerator(accelerator: str | None) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}: this machine has no CUDA GPU that torch can use "
                          f"(torch {torch.__version__}); use trainer.accelerator=auto or cpu")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps: Apple's Metal backend is not available here")


def _check_devices(devices: Any) -> None:
    """One run, one device: Lightning would start a process per device (DDP), which cfae's runs do not use."""
    if OmegaConf.is_config(devices):
        devices = OmegaConf.to_container(devices)
    if devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1 and is_int(devices[0])):
        return
    raise ConfigError(f"trainer.devices={_show(devices)}: a run trains on one device (1, or [i] for GPU i); "
                      f"a sweep or a study runs one run per device")


def check_against_data(cfg: DictConfig, n_items: int, rating_range: tuple[float, float]) -> None:
    """A ranking cut-off below the number of items, and a relevance threshold on the rating scale. (What a
    model needs of the data, its constructor checks.)"""
    k = OmegaConf.select(cfg, "ranking.k")
    k = max(k) if OmegaConf.is_config(k) or isinstance(k, list) else k
    if k is not None and k >= n_items:
        raise ConfigError(f"ranking.k={k}: must be below the number of items, {n_items} in this data "
                          f"(ranking=null skips the ranking metrics)")
    threshold, (low, high) = OmegaConf.select(cfg, "ranking.threshold"), rating_range
    if threshold is not None and not (is_number(threshold) and low <= threshold <= high):
        raise ConfigError(f"ranking.threshold={_show(threshold)}: must lie on this data's rating scale, {low:g} to "
                          f"{high:g} (a held-out rating at or above it counts as relevant)")


def read_checkpoint(path: str | Path, what: str | None = None) -> dict:
    """The contents of a checkpoint file a user names, read as tensors and plain values only (torch's
    `weights_only`): a file whose pickle holds anything else, which could run code when read, is refused
    in one line, `what` (`resume=...`) naming where it was given."""
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors read as used
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # torch.save's legacy format
    except pickle.UnpicklingError:
        raise ConfigError(f"{what or path}: holds objects other than tensors and plain values, which cfae "
                          f"does not load (unpickling them could run code)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ConfigError(f"{what or path}: not a checkpoint torch can read ({str(err).splitlines()[0]})") from None


def refused_up_front(err: BaseException) -> bool:
    """Whether an error says what was asked cannot run (a value, a file, a store), as opposed to a run that
    went wrong (diverged) or a fault: the same command would fail the same way every time."""
    return isinstance(err, UsageError) and not isinstance(err, Diverged)


@contextlib.contextmanager
def reported_in_one_line() -> Iterator[None]:
    """At the command line: a UsageError is printed as one line on stderr and exits with status 1; with
    HYDRA_FULL_ERROR=1 it propagates with its traceback."""
    try:
        yield
    except UsageError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
