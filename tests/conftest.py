import importlib.util
import sys
from pathlib import Path

import pytest

from cfae.synthetic import planted_ratings, write_ratings


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root holding a small synthetic ml-1m/ratings.dat (300 users x 200 items, planted rank 4)."""
    root = tmp_path_factory.mktemp("data")
    write_ratings(root / "ml-1m" / "ratings.dat", planted_ratings())
    return root


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never download: any attempt fails fast, as on a machine offline (this machine's own servers
    on 127.0.0.1 stay reachable)."""
    import urllib.request

    def refuse(url, *args, **kwargs):
        target = getattr(url, "full_url", url)
        if str(target).startswith(("file:", "http://127.0.0.1", "http://localhost")):
            return real_urlopen(url, *args, **kwargs)
        raise urllib.error.URLError(f"tests are offline (asked for {target})")

    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def benchmark():
    """The module of a script in benchmarks/, by name: `benchmark("time_to_accuracy").main`."""

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:  # as `python benchmarks/<name>.py` has it: benchmarks/common.py importable
        sys.path.insert(0, folder)

    def load(name: str):
        path = Path(folder) / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # importable by name, as Hydra's `_target_` finds a benchmark's callback
        spec.loader.exec_module(module)
        return module

    return load
