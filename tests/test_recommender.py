from pathlib import Path

import numpy as np
import pytest

import cfae
from cfae import recommend
from cfae.checks import UsageError
from cfae.models import AutoRec
from cfae.ranking import score_matrix
from cfae.recommender import UnknownId
from cfae.synthetic import planted_ratings, write_ratings

USER = 7  # an original MovieLens-style id (1-based)


@pytest.fixture(scope="module", params=["item", "user"])
def fitted(request, tmp_path_factory):
    """A tiny AutoRec fitted on planted ratings whose release folder has a movies.dat, and its MLflow store."""
    tmp_path = tmp_path_factory.mktemp(f"rec-{request.param}")
    root = tmp_path / "data"
    write_ratings(root / "ml-1m" / "ratings.dat", planted_ratings(n_users=120, n_items=80, density=0.3))
    (root / "ml-1m" / "movies.dat").write_text("".join(f"{i}::Movie {i} (1999)::Drama\n" for i in range(1, 81)),
                                               encoding="latin-1")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg = cfae.compose("hidden=16", f"data.root={root}", "data.download=false", f"data.orientation={request.param}",
                       "data.batch_size=16", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
                       "ranking=null", f"logger.uri={uri}", f"output_dir={tmp_path / 'out'}")
    return cfae.fit(cfg), uri, tmp_path


def own_ranking(trained, user_id: int, k: int) -> list[int]:
    """The top k of the model's own dense scores for one user, rated movies excluded, in original ids."""
    dm = trained.datamodule
    scores = score_matrix(trained.model, dm.test_inputs)
    seen = dm.test_inputs
    if dm.orientation == "item":
        scores, seen = scores.T, seen.T.tocsr()
    u = int(np.flatnonzero(dm.user_ids == user_id)[0])
    row = np.clip(scores[u].astype(np.float64), 1, 5)
    row[seen[u].indices] = -np.inf
    return [int(dm.item_ids[i]) for i in np.argsort(-row, kind="stable")[:k]]


def test_a_loaded_run_recommends_k_unrated_movies_in_the_order_of_the_models_own_scores(fitted):
    trained, uri, _ = fitted
    rec = cfae.load(trained.run_id, tracking_uri=uri)
    top = rec.recommend(USER, 10)
    ids = [r.item_id for r in top]
    assert len(set(ids)) == 10 and [r.rank for r in top] == list(range(1, 11))
    dm = trained.datamodule
    rated = rec.user_ratings()[rec.user_index[USER]].indices
    assert not set(ids) & {int(dm.item_ids[i]) for i in rated}
    assert ids == own_ranking(trained, USER, 10)
    assert all(r.title == f"Movie {r.item_id} (1999)" for r in top)
    assert [r.rating for r in top] == sorted((r.rating for r in top), reverse=True)
    with_seen = rec.recommend(USER, 10, exclude_seen=False)
    assert with_seen[0].rating >= top[0].rating


def test_predict_gives_the_models_own_scores_for_pairs_of_original_ids(fitted):
    trained, uri, tmp_path = fitted
    rec = cfae.load(tmp_path / "out")  # the run's output folder works as well as its run id
    by_checkpoint = cfae.load(tmp_path / "out" / "checkpoints" / "best.ckpt")  # and one of its checkpoints
    assert by_checkpoint.recommend(USER, 5) == rec.recommend(USER, 5)
    movies = [int(m) for m in trained.datamodule.item_ids[:5]]
    predicted = rec.predict([USER] * 5, movies)
    by_scores = rec.scores(USER)[[rec.item_index[m] for m in movies]]
    np.testing.assert_allclose(predicted, by_scores, rtol=1e-5)
    assert np.all((predicted >= 1) & (predicted <= 5))


def test_unknown_ids_get_the_popular_fallback_or_a_clear_error(fitted):
    trained, uri, tmp_path = fitted
    rec = cfae.load(tmp_path / "out" / "model")  # the run's MLflow pyfunc model folder
    fallback = rec.recommend(99999, 5)
    ratings = rec.user_ratings()
    good = (ratings >= 4).sum(axis=0).A1
    assert [rec.item_index[r.item_id] for r in fallback] == list(np.argsort(-good, kind="stable")[:5])
    with pytest.raises(UnknownId, match=r"^item 4242 is not in the model's data \(80 items"):
        rec.predict([USER], [4242])
    with pytest.raises(UnknownId, match=r"^user 99999 is not in the model's data"):
        rec.predict([99999], [1])


def test_many_users_are_answered_together_as_each_alone(fitted):
    trained, uri, tmp_path = fitted
    rec = cfae.load(tmp_path / "out")
    users = [USER, 99999, 3, USER, 11]  # an unknown user and a repeated one among them
    together = rec.recommend_many(users, 7)
    assert together == [rec.recommend(u, 7) for u in users]
    assert [r.item_id for r in together[2]] == own_ranking(trained, 3, 7)
    rated = len(rec.user_ratings()[rec.user_index[USER]].indices)
    assert len(rec.recommend(USER, 10_000)) == len(rec.item_ids) - rated  # no rated item fills a long list


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_k_must_be_a_positive_integer(fitted, k):
    trained, uri, tmp_path = fitted
    with pytest.raises(UsageError, match=rf"^k={k}: must be an integer >= 1"):
        cfae.load(tmp_path / "out").recommend(USER, k)


@pytest.mark.parametrize("user", [42.7, "42.7", None, True])
def test_an_id_that_is_not_a_whole_number_is_refused_not_rounded(fitted, user):
    _, _, tmp_path = fitted
    with pytest.raises(UsageError, match="not an id of this model's data"):
        cfae.load(tmp_path / "out").recommend(user, 3)


def test_the_saved_model_is_code_and_data_not_a_pickle(fitted):
    _, _, tmp_path = fitted
    model = tmp_path / "out" / "model"
    assert not list(model.rglob("*.pkl")) and (model / "pyfunc_model.py").is_file()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in (model / "MLmodel").read_text()


def test_the_command_prints_the_same_list(fitted, capsys):
    trained, uri, _ = fitted
    assert recommend.main([f"run={trained.run_id}", f"user={USER}", "k=10", f"uri={uri}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"top 10 for user {USER} (predicted ratings, unrated items only)"
    assert [int(line.split()[1]) for line in lines[2:]] == own_ranking(trained, USER, 10)


@pytest.mark.parametrize("args, expected", [
    (["user=7"], "give the model as run=<MLflow run id> or path=<folder>, one of the two"),
    (["path=x", "user=7", "k=-1"], "k=-1: must be an integer >= 1 (how many items to recommend)"),
    (["path=x", "user=7", "k=0"], "k=0: must be an integer >= 1 (how many items to recommend)"),
])
def test_the_command_refuses_bad_arguments_in_one_line(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_:
        recommend.main(args)
    assert exit_.value.code == 1 and capsys.readouterr().err.strip() == f"error: {expected}"


def test_a_checkpoint_rebuilds_its_model_from_its_own_hyperparameters(fitted):
    trained, _, tmp_path = fitted
    model = AutoRec.load_from_checkpoint(tmp_path / "out" / "checkpoints" / "best.ckpt", map_location="cpu")
    assert model.hparams.hidden_size == 16 and model.hparams.n_inputs == trained.datamodule.n_cols
    for name, tensor in trained.model.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name].numpy(), tensor.cpu().numpy())


def test_the_pyfunc_model_answers_top_k_lists_and_pairs_as_the_recommender_does(fitted, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    trained, uri, _ = fitted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{trained.run_id}/model")
    rec = cfae.load(trained.run_id, tracking_uri=uri)
    top = model.predict(pd.DataFrame({"user_id": [USER]}), params={"k": 5})
    assert list(top.item_id) == [r.item_id for r in rec.recommend(USER, 5)] and list(top["rank"]) == [1, 2, 3, 4, 5]
    movies = [int(m) for m in trained.datamodule.item_ids[:3]]
    pairs = model.predict(pd.DataFrame({"user_id": [USER] * 3, "item_id": movies}))
    np.testing.assert_allclose(pairs.rating, rec.predict([USER] * 3, movies), rtol=1e-6)
    from cfae.serving import RequestError

    for request, params, expected in (
            ({"user_id": [USER]}, {"k": -1}, "k=-1: must be an integer >= 1"),
            ({"user_id": [42.7]}, None, "user id 42.7: not an id of this model's data"),
            ({"user_id": [USER], "item_id": [4242]}, None, "item 4242 is not in the model's data")):
        with pytest.raises(RequestError) as refused:
            model.predict(pd.DataFrame(request), params=params)
        assert refused.value.message.startswith(expected) and refused.value.get_http_status_code() == 400


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_real_http_request_with_the_same_list(fitted):
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    trained, uri, tmp_path = fitted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{trained.run_id}/model",
                               "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri,  # it starts `uvicorn` from PATH
                                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
                              cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(0.5)
        def ask(records: list[dict], params: dict | None = None) -> tuple[int, dict]:
            body = json.dumps({"dataframe_records": records, **({"params": params} if params else {})}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as refused:
                return refused.code, json.loads(refused.read())

        status, answer = ask([{"user_id": USER}], {"k": 10})
        refusals = [ask([{"user_id": USER}], {"k": -1}), ask([{"user_id": 42.7}]),
                    ask([{"user_id": USER, "item_id": 4242}])]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert status == 200 and [row["item_id"] for row in answer["predictions"]] == own_ranking(trained, USER, 10)
    # MLflow's scoring server answers cfae's refusals with 400 and cfae's own line: no request, no stack trace
    assert [(code, body["message"]) for code, body in refusals] == [
        (400, "k=-1: must be an integer >= 1 (how many items to recommend)"),
        (400, "user id 42.7: not an id of this model's data (its ids are whole numbers)"),
        (400, "item 4242 is not in the model's data (80 items; items with too few ratings were dropped before "
              "training)")]
    assert not any("stack_trace" in body for _, body in refusals)
