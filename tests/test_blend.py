"""The blend of study rows: weights fitted on validation, members checked against their runs, on small
synthetic studies."""

import datetime
import math
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cfae import blend, report, study
from cfae.checks import UsageError

PLAN = """
name: {name}
folds: [0, 1]
rows: [{row}]
protocols:
  "80-20": {{overrides: []}}
figure_folds: []
figures: {{}}
"""


def run_study(tmp_path, data_root, name: str, row: str, *extra: str) -> None:
    plan = tmp_path / f"{name}.yaml"
    plan.write_text(PLAN.format(name=name, row=row))
    assert study.main(["--config", str(plan), "--output-dir", str(tmp_path / name), "--",
                       f"data.root={data_root}", "data.download=false", "data.batch_size=32", "trainer.max_epochs=3",
                       "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                       f"logger.uri=sqlite:///{tmp_path}/mlflow.db", *extra]) == 0


@pytest.fixture(scope="module")
def studies(data_root, tmp_path_factory):
    """I-AutoRec with refit=true (item rows) and the study's U-AutoRec (user rows), two folds each."""
    tmp_path = tmp_path_factory.mktemp("blend")
    run_study(tmp_path, data_root, "items", "autorec", "refit=true")
    run_study(tmp_path, data_root, "users", "study_autorec")
    return tmp_path, f"sqlite:///{tmp_path}/mlflow.db"


def test_the_weights_are_the_least_squares_fit():
    rng = np.random.default_rng(0)
    preds = rng.uniform(1, 5, size=(2, 500))
    weights = blend.fit_weights(preds, 0.5 + 0.3 * preds[0] + 0.6 * preds[1])
    assert weights == pytest.approx([0.5, 0.3, 0.6])
    assert blend.blended(np.array([0.0, 2.0]), np.array([[1.0, 2.0, 3.0]]), (1.0, 5.0)).tolist() == [2.0, 4.0, 5.0]


def test_a_blend_of_two_studies_rows_is_tested_on_each_fold_and_reported(studies, capsys):
    tmp_path, uri = studies
    assert blend.main(["--study", "items,users", "--rows", "autorec,study_autorec", "--name", "b",
                       "--out", str(tmp_path / "reports"), "--uri", uri]) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cfae").experiment_id
    runs = {r.data.tags["cfae.key"]: r for r in client.search_runs([experiment], "tags.`cfae.study` = 'b'")}
    assert set(runs) == {"blend/80-20/fold0", "blend/80-20/fold1"}
    members = {(r.data.tags["cfae.row"], r.data.params["data/fold"]): r
               for s in ("items", "users") for r in client.search_runs([experiment], f"tags.`cfae.study` = '{s}'")}
    for fold in (0, 1):
        m = runs[f"blend/80-20/fold{fold}"].data.metrics
        auto, user = members[("autorec", str(fold))].data.metrics, members[("study_autorec", str(fold))].data.metrics
        # each row's test RMSE, computed again from its checkpoint on the blend's side, is its run's
        assert m["blend/test_rmse/autorec"] == pytest.approx(auto["test/rmse"], abs=1e-4)
        assert m["blend/test_rmse/study_autorec"] == pytest.approx(user["test/rmse"], abs=1e-4)
        # fitted on validation, the blend is no worse there than either chosen model alone (weights 1 and 0)
        assert m["blend/val_rmse_fitted"] <= min(auto["val/rmse_best"], user["val/rmse_best"]) + 1e-6
        assert "test/rmse_before_refit" in m and math.isfinite(m["test/rmse"])
    text = (tmp_path / "reports" / "b.md").read_text()
    assert "| w autorec | w study_autorec |" in text and "mean ± 95% CI" in text
    assert f"Blended {datetime.date.today().isoformat()} on " in text  # the date beside the figures
    rows = report.report("b", tmp_path / "report", uri=uri, log_to_mlflow=False)["rows"]
    assert [(r["row"], r["folds"]) for r in rows] == [("blend", 2)]
    with pytest.raises(SystemExit):  # another blend under the same name would share its row
        blend.main(["--study", "items,users", "--rows", "study_autorec,autorec", "--name", "b", "--uri", uri])
    assert "error: --name b: the study holds a blend of other rows" in capsys.readouterr().err


def test_rows_without_runs_or_on_other_splits_are_refused(studies, data_root, capsys):
    tmp_path, uri = studies
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cfae").experiment_id
    with pytest.raises(UsageError, match="no fold has a finished run of every row"):
        blend.members_by_fold(client, experiment, ["items"], ["autorec", "mf"], None)
    run_study(tmp_path, data_root, "seeded", "mf", "data.seed=1")  # other splits of the same ratings
    with pytest.raises(SystemExit) as err:
        blend.main(["--study", "items,seeded", "--rows", "autorec,mf", "--uri", uri])
    assert err.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: rows autorec and mf hold out different ratings on this fold")


def test_a_folder_whose_weights_are_not_its_runs_is_refused(studies, tmp_path):
    _, uri = studies
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cfae").experiment_id
    by_key = {r.data.tags["cfae.key"]: r for r in client.search_runs([experiment], "tags.`cfae.study` = 'users'")}
    fold0, fold1 = (by_key[f"study_autorec/80-20/fold{k}"] for k in (0, 1))
    members = blend.members_by_fold(client, experiment, ["items", "users"], ["autorec", "study_autorec"], None)
    users0 = members[("80-20", 0)][1]
    assert users0.run_id == fold0.info.run_id
    swapped = shutil.copytree(users0.output_dir, tmp_path / "swapped")
    users1 = members[("80-20", 1)][1]
    assert users1.run_id == fold1.info.run_id
    shutil.copyfile(users1.output_dir / "checkpoints" / "best.ckpt", swapped / "checkpoints" / "best.ckpt")
    with pytest.raises(UsageError, match="holds another run's weights"):
        blend.fold_predictions([members[("80-20", 0)][0], users0._replace(output_dir=swapped)])
    with pytest.raises(UsageError, match="logged no test/rmse"):
        blend.fold_predictions([members[("80-20", 0)][0], users0._replace(test_rmse=math.nan)])
    items0 = members[("80-20", 0)][0]
    unrefitted = shutil.copytree(items0.output_dir, tmp_path / "unrefitted")
    (unrefitted / "checkpoints" / "refit.ckpt").unlink()
    with pytest.raises(UsageError, match="refit=true tested this model"):
        blend.fold_predictions([items0._replace(output_dir=unrefitted), users0])
