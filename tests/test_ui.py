"""The MLflow UI as a reader opens it: a tiny run and a tiny sweep, `mlflow ui`, and headless Chromium."""

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from browser import CLOSE_ASSISTANT, HEADERS, ROWS, Page, chromium, expand
from mlflow.tracking import MlflowClient

from cfae.tracking import RESULTS_COLUMNS, RESULTS_VIEW, mlflow_client, runs_page

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.max_epochs=3", "trainer.enable_progress_bar=false", "data.batch_size=32", "ranking=null"]
VIEW_TAG = f"mlflow.sharedViewState.{RESULTS_VIEW}"


def test_the_experiment_carries_cfaes_saved_view_of_the_runs_table(tmp_path):
    client, experiment_id = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    envelope = json.loads(client.get_experiment(experiment_id).tags[VIEW_TAG])
    assert envelope["name"] == "cfae results" and isinstance(envelope["createdAt"], int)
    assert json.loads(envelope["state"])["selectedColumns"] == list(RESULTS_COLUMNS)
    assert "metrics.`test/rmse`" in RESULTS_COLUMNS
    assert runs_page(experiment_id).endswith(
        f"#/experiments/{experiment_id}/runs?viewStateShareKey={RESULTS_VIEW}&workflowType=machine_learning")


def test_the_installed_mlflow_ui_still_reads_saved_views_from_experiment_tags():
    """The saved view leans on the UI's own tag format; an MLflow whose bundle no longer has it fails here,
    before anyone opens the UI (tests/test_ui.py's browser test shows the view itself)."""
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    if not bundle.is_dir():
        pytest.skip(f"this MLflow has no UI bundle at {bundle}")
    text = "\n".join(p.read_text(errors="replace") for p in bundle.glob("*.js"))
    assert '"mlflow.sharedViewState."' in text
    assert "viewStateShareKey" in text and '"workflowType"' in text
    assert re.search(r"name:e,createdAt:\w,updatedAt:\w,state:\w", text)  # the saved-view envelope


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(data_root, tmp_path_factory):
    """`train.py` once and a two-trial `sweep.py -m` grid, as a user runs them, in one folder."""
    cwd = tmp_path_factory.mktemp("ui")
    env = {**os.environ, "CFAE_DATA_DIR": str(data_root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    for command in (["train.py", "hidden=16"], ["sweep.py", "-m", "hidden=8,16"]):
        done = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:], *FAST], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
    return cwd


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
def test_mlflow_ui_opens_on_the_runs_table_with_the_sweep_nested_and_test_rmse_shown(store):
    pytest.importorskip("aiohttp", reason="the browser test speaks to Chromium through aiohttp's websocket")
    uri = f"sqlite:///{store}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("cfae").experiment_id
    found = {r.info.run_id: r for r in client.search_runs([experiment_id])}
    parent = next(r for r in found.values() if r.info.run_name.startswith("sweep-"))
    children = {i for i, r in found.items() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    (plain,) = set(found) - children - {parent.info.run_id}
    assert len(children) == 2

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--host", "127.0.0.1", "--port",
                               str(port), "--backend-store-uri", uri], cwd=store, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # a busy machine can take minutes to start it
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not answer within three minutes"
                time.sleep(0.5)
        shown = asyncio.run(read_the_runs_page(runs_page(experiment_id, f"http://127.0.0.1:{port}"), store))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

    headers, top, expanded = shown
    assert "test/rmse" in headers and "val/rmse_best" in headers
    assert [row["id"] for row in top] == [parent.info.run_id, plain]  # newest first; the trials folded in
    assert [row["id"] for row in expanded][0] == parent.info.run_id
    assert set(row["id"] for row in expanded[1:3]) == children  # right under their parent
    assert expanded[3]["id"] == plain
    for row in expanded[1:]:  # the value MLflow holds, as the table shows it
        assert float(row["test_rmse"]) == pytest.approx(found[row["id"]].data.metrics["test/rmse"], rel=1e-6)


async def read_the_runs_page(url: str, folder: Path) -> tuple[list[str], list[dict], list[dict]]:
    """The column headers, the rows as the page opens, the rows once the sweep is expanded; a screenshot of
    the page goes to $CFAE_UI_SCREENSHOT if set, else into `folder`."""
    async with Page(url) as page:
        await page.wait_for(f"{ROWS}.length >= 2", timeout=120)
        await page.evaluate(CLOSE_ASSISTANT)
        headers, top = await page.evaluate(HEADERS), await page.evaluate(ROWS)
        assert await page.wait_for(expand("sweep-"))
        await page.wait_for(f"{ROWS}.length >= 4")
        expanded = await page.evaluate(ROWS)
        Path(os.environ.get("CFAE_UI_SCREENSHOT", folder / "runs.png")).write_bytes(await page.screenshot())
    return headers, top, expanded
