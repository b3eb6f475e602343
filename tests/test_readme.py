"""The README's commands, run as written (on the synthetic ML-1M, in a folder of their own): a command a user
copies must work. Every command of its ```bash blocks runs, unless NOT_RUN says why not."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
BUDGET = "a sweep of a budget of trials (8 to 20): minutes, not seconds; tests/test_sweep.py runs sweeps"
NOT_RUN = {  # the start of a command: why the test leaves it out
    "scripts/setup": "sets up the clone: CI runs it (.ci/run) before the tests",
    "pip install": "installs cfae and its dependencies, torch's GBs among them; tests/test_cli.py builds the wheel",
    "python train.py data=table data.path=ratings.csv": "needs your ratings.csv; tests/test_tables.py runs tables",
    "python train.py data=ml20m resume=": "a placeholder for a run's own folder",
    "python sweep.py -m model=autorec ": BUDGET,
    "python sweep.py -m model=vae ": BUDGET,
    "python sweep.py -m model=mf ": BUDGET,
    "python sweep.py -m model=deep hydra/launcher=joblib": BUDGET + ", four processes at once",
}
SERVERS = {"mlflow models serve": "/ping", "mlflow ui": "/health"}  # started, asked whether they answer, stopped


def readme_commands() -> list[str]:
    """Every command of the README's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [c.strip() for block in blocks for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def left_out(command: str) -> str | None:
    bare = command.split("#")[0].rstrip() + " "
    return next((why for start, why in NOT_RUN.items() if bare.startswith(start)), None)


def test_every_readme_command_is_run_or_said_why_not():
    commands = readme_commands()
    assert any(c.startswith("python train.py") for c in commands) and any("serve" in c for c in commands)
    unused = [start for start in NOT_RUN if not any(left_out(c) and (c + " ").startswith(start) for c in commands)]
    assert not unused, f"NOT_RUN names commands the README no longer has: {unused}"


def wait_until_it_answers(url: str, server: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds  # a busy machine takes a minute to start MLflow's servers
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None, f"{url}: the server exited: {server.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"{url}: no answer in {seconds:.0f} s"
            time.sleep(0.5)


@pytest.mark.slow
def test_the_readme_commands_run_as_written(data_root, tmp_path):
    for name in ("train.py", "sweep.py", "conf"):  # the clone's files, the outputs in a folder of their own
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    env = {**os.environ, "CFAE_DATA_DIR": str(data_root),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    ran, servers = [], []
    try:
        for command in readme_commands():
            if left_out(command):
                continue
            if "<run id>" in command:  # the newest run with a model (a sweep packages its best trial's only)
                store = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
                last = next(r for r in store.search_runs(["1"], "attributes.status = 'FINISHED'",
                                                         order_by=["attributes.start_time DESC"])
                            if any(a.path == "model" for a in store.list_artifacts(r.info.run_id)))
                command = command.replace("<run id>", last.info.run_id)
            server = next((path for start, path in SERVERS.items() if start in command), None)
            if server:
                servers.append(subprocess.Popen(command, shell=True, cwd=tmp_path, env=env, text=True,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                start_new_session=True))
                port = re.search(r"-p (\d+)", command)
                wait_until_it_answers(f"http://127.0.0.1:{port[1] if port else 5000}{server}", servers[-1])
            else:
                done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=900)
                assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
                if command.startswith("curl"):
                    assert '"predictions"' in done.stdout and '"rank": 1' in done.stdout, done.stdout
            ran.append(command)
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    assert len(ran) >= 10, ran
