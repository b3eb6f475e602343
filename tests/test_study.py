"""The study runner and the report, on small synthetic data, so neither can rot."""

import csv
import math
import os
from datetime import datetime, timezone

import pytest
from mlflow.tracking import MlflowClient

from cfae import report, study
from cfae.report import mean_ci

MINI_PLAN = """
name: mini
folds: [0, 1]
rows: [autorec, deep, deep_bn, vae, svd]
protocols:
  "80-20": {overrides: []}
  "90-10": {overrides: [data.test_fraction=0.1], rows: [autorec]}
figure_folds: [0]
figures:
  fig3_latent_size: {experiment: autorec, knob: hidden, values: [8, 32]}
  fig4_denoising: {experiment: denoising, knob: noise, values: [0.0, 0.3]}
  fig6_refeeding: {experiment: deep_refeed}
  fig7_batch_norm: {experiment: deep_500_700}
"""


def test_mean_ci_uses_the_t_distribution():
    mean, ci = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t(0.975, 2 dof) = 4.3027
    assert math.isnan(mean_ci([0.9])[1])  # one fold: no interval, not a zero-width one


def overrides(data_root, tmp_path):
    return [f"data.root={data_root}", "data.download=false", "data.batch_size=32", "trainer.max_epochs=2",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            f"logger.uri=sqlite:///{tmp_path}/mlruns/mlflow.db"]


@pytest.fixture(scope="module")
def mini_study(data_root, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    (tmp_path / "plan.yaml").write_text(MINI_PLAN)
    argv = ["--config", str(tmp_path / "plan.yaml"), "--output-dir", str(tmp_path / "out"), "--",
            *overrides(data_root, tmp_path)]
    assert study.main(argv) == 0
    from hydra.core.hydra_config import HydraConfig

    assert not HydraConfig.initialized()  # a run composed next in this process is named by its own config
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return tmp_path, argv, client


def test_the_study_runs_every_row_on_every_fold_with_tags(mini_study):
    tmp_path, _, client = mini_study
    runs = client.search_runs([client.get_experiment_by_name("cfae").experiment_id], "tags.`cfae.study` = 'mini'")
    keys = {r.data.tags["cfae.key"] for r in runs}
    assert len(runs) == len(keys) == 5 * 2 + 2 + 2 + 2 + 1 + 1  # rows x folds, 90:10, the figures' runs
    assert {"autorec/80-20/fold1", "svd/80-20/fold0", "autorec/90-10/fold1", "fig3_latent_size/fold0/hidden=8",
            "fig6_refeeding/fold0"} <= keys
    by_key = {r.data.tags["cfae.key"]: r for r in runs}
    assert by_key["autorec/90-10/fold0"].data.params["data/test_fraction"] == "0.1"
    assert by_key["fig3_latent_size/fold0/hidden=8"].data.params["model/hidden_size"] == "8"
    assert by_key["deep_bn/80-20/fold1"].data.tags["cfae.row"] == "deep_bn"
    assert by_key["deep_bn/80-20/fold1"].data.tags["cfae.model"] == "deep_bn"  # named as train.py would
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_study_run_again_resumes_and_runs_nothing_twice(mini_study):
    tmp_path, argv, client = mini_study
    experiment_id = client.get_experiment_by_name("cfae").experiment_id
    before = len(client.search_runs([experiment_id]))
    assert study.main(argv) == 0
    assert len(client.search_runs([experiment_id])) == before


def test_a_run_counts_as_done_only_with_the_same_settings(mini_study, capsys):
    tmp_path, argv, _ = mini_study
    options, overrides = argv[:argv.index("--")], argv[argv.index("--"):]
    assert study.main([*options, "--dry-run", *overrides]) == 0
    same = capsys.readouterr().out.splitlines()
    assert len(same) == 18 and all(line.startswith("done  ") for line in same)
    assert study.main([overrides[1], *options, "--dry-run", *overrides[2:]]) == 0  # overrides before and after
    assert capsys.readouterr().out.splitlines() == same
    assert study.main([*options, "--dry-run", *overrides, "data.seed=1"]) == 0  # other splits: nothing done
    other = capsys.readouterr().out.splitlines()
    assert len(other) == 18 and all(line.startswith("todo  ") for line in other)
    assert study.main([*options, "--dry-run", "--only", "autorec/*/fold1,vae/80-20/*", *overrides]) == 0
    keys = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert keys == ["vae/80-20/fold0", "autorec/80-20/fold1", "vae/80-20/fold1", "autorec/90-10/fold1"]  # plan order
    skip = ["--skip", "autorec/*,svd/*,deep*"]
    assert study.main([*options, "--dry-run", "--only", "*/80-20/*", *skip, *overrides]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["vae/80-20/fold0", "vae/80-20/fold1"]
    with pytest.raises(SystemExit):
        study.main([*options, "--dry-run", "--only", "mf/*", *overrides])
    assert "--only mf/*: no run of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main([*options, "--dry-run", "--only", "vae/*", "--skip", "*/80-20/*", *overrides])
    assert "--skip */80-20/*: it leaves no run of" in capsys.readouterr().err


@pytest.mark.slow
def test_two_runs_at_a_time_give_the_runs_and_results_of_one_at_a_time(mini_study, data_root, tmp_path):
    src, argv, client = mini_study
    options = argv[:argv.index("--")]
    only = ["--only", "autorec/80-20/*,svd/80-20/fold0,fig3_latent_size/*"]
    assert study.main([*options, *only, "--jobs", "2", "--", *overrides(data_root, tmp_path)]) == 0

    def results(client):
        runs = client.search_runs([client.get_experiment_by_name("cfae").experiment_id], "tags.`cfae.study` = 'mini'")
        return {r.data.tags["cfae.key"]: (r.info.status, r.data.tags["cfae.config"], r.data.metrics["test/rmse"],
                                          r.data.tags["cfae.process"].split(":")[1]) for r in runs}

    parallel, in_turn = results(MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")), results(client)
    assert sorted(parallel) == ["autorec/80-20/fold0", "autorec/80-20/fold1", "fig3_latent_size/fold0/hidden=32",
                                "fig3_latent_size/fold0/hidden=8", "svd/80-20/fold0"]
    for key, (status, digest, rmse, _) in parallel.items():  # the same settings, one thread instead of all
        assert status == "FINISHED" and digest == in_turn[key][1]
        assert rmse == pytest.approx(in_turn[key][2], abs=1e-4), key
    pids = {pid for *_, pid in parallel.values()}
    assert len(pids) <= 2 and str(os.getpid()) not in pids  # worker processes, none of them this one
    assert study.main([*options, *only, "--jobs", "2", "--", *overrides(data_root, tmp_path)]) == 0  # all done:
    assert results(MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")) == parallel  # nothing run again


def test_the_report_has_every_row_with_intervals_and_all_six_figures(mini_study):
    tmp_path, _, client = mini_study
    out = tmp_path / "reports"
    result = report.report("mini", out, uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert result["missing"] == []
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert [p[:4] for p in pngs] == ["fig3", "fig4", "fig5", "fig6", "fig7", "fig8"]
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    with (out / "mini.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["protocol"], r["row"]) for r in rows} == {("80-20", m) for m in ["autorec", "deep", "deep_bn", "vae",
                                                                                "svd"]} | {("90-10", "autorec")}
    for r in rows:
        assert r["folds"] == "2" and 0.3 < float(r["rmse"]) <= 4 and float(r["rmse_ci"]) >= 0
        assert 0 <= float(r["recall_at_10"]) <= 1
    text = (out / "mini.md").read_text()
    assert "± " in text and "VAE 500,200" in text and "![fig8_vae.png](fig8_vae.png)" in text
    # where, when and how: the machine the runs recorded, their date, the study's and the report's commands
    from cfae.processes import machine

    assert f"{machine()}; python -m cfae.study --config '<dir>/plan.yaml'" in text  # no folder of this machine
    assert "; python -m cfae.report" in text and datetime.now(timezone.utc).date().isoformat() in text
    (logged,) = client.search_runs([client.get_experiment_by_name("cfae").experiment_id], "tags.`cfae.report` = 'mini'")
    names = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"mini.md", "mini.csv", "fig3_latent_size.png", "fig8_vae.png"} <= names


def test_a_figure_whose_runs_are_missing_is_not_drawn(mini_study, tmp_path):
    src, _, client = mini_study
    records = report.load_runs(client, client.get_experiment_by_name("cfae").experiment_id, "mini")
    rows_only = [r for r in records if not r["figure"]]  # as if the figures' runs had not been run
    drawn = report.figures(client, rows_only, tmp_path, "python -m cfae.report")
    assert {name for name, ok in drawn.items() if ok} == {"fig5_deep.png", "fig8_vae.png"}  # rows suffice
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["fig5_deep.png", "fig8_vae.png"]


def test_the_report_names_missing_figures_only_when_some_are_drawn():
    assert report.figure_note({"fig3.png": True, "fig4.png": True}) == ""
    assert report.figure_note({"fig3.png": True, "fig4.png": False}).strip() == (
        "Missing figures (their runs are not in the store): fig4.png")
    assert "Missing" not in report.figure_note({"fig3.png": False, "fig4.png": False})  # a plan without figures


def test_the_report_of_an_unknown_study_is_an_error(mini_study, tmp_path):
    src, _, _ = mini_study
    with pytest.raises(SystemExit, match="no finished runs"):
        report.report("nonesuch", tmp_path, uri=f"sqlite:///{src}/mlruns/mlflow.db", log_to_mlflow=False)


@pytest.mark.slow
def test_the_real_plan_runs_quickly_with_two_epochs_and_reports_every_row(data_root, tmp_path):
    """conf/study.yaml itself, every row and figure, folds 0 and 1, two epochs: the quick variant."""
    assert study.main(["--name", "quick", "--folds", "0,1", "--output-dir", str(tmp_path / "out"), "--",
                       *overrides(data_root, tmp_path)]) == 0
    result = report.report("quick", tmp_path / "reports", uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert result["missing"] == []
    rows = {(r["protocol"], r["row"]): r for r in result["rows"]}
    plan = study.OmegaConf.load(study.CONF / "study.yaml")
    assert set(rows) == {("80-20", r) for r in plan.rows} | {("90-10", r) for r in plan.protocols["90-10"].rows}
    assert all(r["folds"] == 2 and not math.isnan(r["rmse_ci"]) for r in rows.values())


def test_the_report_shows_the_model_validation_chose_beside_a_refit_one(caplog):
    def record(row, fold, rmse, before):
        return {"key": f"{row}/90-10/fold{fold}", "row": row, "figure": None, "protocol": "90-10", "fold": fold,
                "test/rmse": rmse, "test/rmse_before_refit": before, "time/fit_s": 10.0, "epochs": 5,
                "test/recall_at_10": 0.1, "test/ndcg_at_10": 0.1}

    plain = [record("mf", k, 0.85, math.nan) for k in range(2)]
    rows = report.table([record("autorec", 0, 0.83, 0.832), record("autorec", 1, 0.83, 0.834), *plain])
    text = report.markdown(rows, "refit", "python -m cfae.study")
    header, _, autorec, mf = text.split("## Protocol 90:10")[1].strip().splitlines()[:4]
    assert header.split(" | ")[3:5] == ["test RMSE", "before refit"]
    assert autorec.split(" | ")[3:5] == ["0.8300 ± 0.0000", "0.8330 ± 0.0127"]
    assert mf.split(" | ")[4] == "" and "With refit=true" in text
    with caplog.at_level("WARNING", logger="cfae.report"):
        report.table([record("mf", 2, 0.85, 0.86), *plain])
    assert "mf at 90-10: some folds were run with refit=true and some without" in caplog.text
    text = report.markdown(report.table(plain), "plain", "python -m cfae.study")
    assert "before refit" not in text and "refit=true" not in text


def test_a_reports_commands_name_no_folder_of_the_authors_machine(tmp_path):
    from cfae.report import portable

    written = ("python -m cfae.study --output-dir /work/s21/out --only 'autorec/80-20/*' "
               f"logger.uri=sqlite:////work/s21/mlflow.db --config {tmp_path}/conf/plan.yaml")
    assert portable(written, here=tmp_path) == (
        "python -m cfae.study --output-dir '<dir>/out' --only 'autorec/80-20/*' "
        "'logger.uri=sqlite:///<dir>/mlflow.db' --config conf/plan.yaml")
    assert portable("python -m cfae.report --out reports") == "python -m cfae.report --out reports"


def test_a_figures_footer_is_wrapped_to_the_figure_and_names_no_absolute_path(tmp_path):
    import matplotlib.pyplot as plt

    from cfae.report import provenance, stamp

    records = [{"machine": "AMD EPYC, 2 cores, no GPU", "date": "2026-12-06",
                "command": "python -m cfae.study --jobs 2 --only " + ",".join(f"row{i}/80-20/*" for i in range(20))
                           + " logger.uri=sqlite:////home/someone/runs/mlflow.db"}]
    fig, _ = plt.subplots(figsize=(5.5, 3.8))
    stamp(fig, provenance(records, "python -m cfae.report --uri sqlite:////home/someone/runs/mlflow.db"))
    fig.canvas.draw()
    (footer,) = fig.texts
    box = footer.get_window_extent()
    assert box.x1 <= fig.bbox.x1 and "/home/someone" not in footer.get_text()
    plt.close(fig)


def test_a_runs_digest_is_pinned_and_the_same_wherever_the_run_computes():
    """A study resumes by its store's digests: what a digest hashes changes only on purpose (the value is pinned),
    and the device a launcher places a run on leaves it as composed."""
    from cfae.configs import compose
    from cfae.tracking import config_digest

    run = ("+experiment=autorec", "data.fold=0", "trainer.precision=32-true")
    assert config_digest(compose(*run)) == "a79e8a4cae718dfc"
    for placed in (["threads=1"], ["trainer.accelerator=cpu"], ["trainer.accelerator=gpu", "trainer.devices=[1]"]):
        assert config_digest(compose(*run, *placed)) == "a79e8a4cae718dfc", placed
