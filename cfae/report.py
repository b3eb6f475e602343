"""python -m cfae.report: the study's table and figures 3-8, from its runs in MLflow.

    python -m cfae.report                      # the study `study` (conf/study.yaml) -> reports/
    python -m cfae.report --study quick --out reports/quick

Reads the FINISHED runs tagged `cfae.study=<name>` (written by `python -m cfae.study`), and writes
`<out>/<name>.md` and `<name>.csv` (per protocol and row: test RMSE mean +- 95% CI over folds with the t
distribution, training time mean +- CI, epochs, Recall@10 and NDCG@10) and `<out>/fig3_*.png` ...
`fig8_*.png`; then logs them all as artifacts of one MLflow run tagged `cfae.report=<name>`.
Nothing is typed in by hand: a figure whose runs are missing is reported as missing, not drawn.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shlex
import sys
import textwrap
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from cfae.metrics import EPOCHS, FIT_SECONDS, TEST_RANKING, TEST_RMSE, TEST_RMSE_BEFORE_REFIT, VAL_RMSE
from cfae.tracking import finished_study_runs, mlflow_client

log = logging.getLogger("cfae.report")

METRICS = [TEST_RMSE, TEST_RMSE_BEFORE_REFIT, FIT_SECONDS, EPOCHS, "test/recall_at_10", "test/ndcg_at_10",
           *TEST_RANKING]
# The table's columns: (metric, name in the table's rows); task=ranking's are vae_cf's three (the published
# ML-20M figures are in docs/ranking.md)
RATING_COLUMNS = [(TEST_RMSE, "rmse"), (TEST_RMSE_BEFORE_REFIT, "rmse_before_refit"), (FIT_SECONDS, "time_s"),
                  (EPOCHS, "epochs"), ("test/recall_at_10", "recall_at_10"), ("test/ndcg_at_10", "ndcg_at_10")]
RANKING_COLUMNS = [("test/ndcg_at_100", "ndcg_at_100"), ("test/recall_at_20", "recall_at_20"),
                   ("test/recall_at_50", "recall_at_50"), (FIT_SECONDS, "time_s"), (EPOCHS, "epochs")]
LABELS = {  # the study's names for its rows (sec. 5), each beside its design as the study describes it, then ours
    "autorec": "Single hidden layer AE (AutoRec, 500)",
    "study_autorec": "Single hidden layer AE, as the study describes it",
    "deep": "Deep AE 300,500,750",
    "study_deep": "Deep AE 300,500,750, as the study describes it",
    "denoising": "Single hidden layer denoising AE",
    "study_denoising": "Single hidden layer denoising AE, as the study describes it",
    "deep_bn": "Batch-normalised deep AE 500,700",
    "study_deep_bn": "Batch-normalised deep AE 500,700, as the study describes it",
    "vae": "VAE 500,200",
    "study_vae": "VAE 500,200, as the study describes it",
    "svd": "SVD, item-mean imputed (the study's baseline)",
    "bias": "Global mean + biases",
    "mf": "Biased MF",
    "autorec_tuned": "AutoRec, tuned on validation",
    "kernel_autorec": "Kernelised AutoRec (Sparse FC)",
    "glocal_k": "GLocal-K",
    "bayesian_fm": "Bayesian FM, implicit features (Rendle et al.)",
    "bayesian_mf": "Bayesian biased MF",
    "kernel_autorec_u1": "Kernelised AutoRec (Sparse FC), ML-100K setting",
    "glocal_k_u1": "GLocal-K, ML-100K setting",
    "deep_500_700": "Deep AE 500,700 (no batch norm)",
    "deep_refeed": "Deep AE 300,500,750 + dense re-feeding",
    "blend": "Blend of rows, weights fitted on validation",
    "multvae": "Mult-VAE 600-200-600 (Liang et al.)",
    "multdae": "Mult-DAE 200 (Liang et al.)",
    "recvae": "RecVAE (Shenbin et al.)",
    "ease": "EASE (Steck)",
    "pop": "Popularity",
}


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-distribution confidence interval (NaN with fewer than 2 values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else math.nan, math.nan
    return float(x.mean()), float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def load_runs(client, experiment_id: str, study: str) -> list[dict]:
    """One record per key (the latest FINISHED run): its tags, fold, metrics and run id. A study name that
    holds runs on several datasets is reported on the dataset of its latest run, with a warning."""
    latest, newest_dataset = {}, None
    for r in finished_study_runs(client, experiment_id, study):  # oldest first: a re-run replaces its key
        t, p = r.data.tags, r.data.params
        newest_dataset = p.get("data/dataset")
        latest[(t["cfae.key"], newest_dataset)] = {
            "run_id": r.info.run_id, "key": t["cfae.key"], "row": t.get("cfae.row"), "figure": t.get("cfae.figure"),
            "protocol": t.get("cfae.protocol"), "fold": int(p.get("data/fold", -1)), "params": p,
            "machine": t.get("cfae.machine", "not recorded"), "command": t.get("cfae.command", ""),
            "date": datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc).date().isoformat(),
            "dataset": newest_dataset, **{m: r.data.metrics.get(m, math.nan) for m in METRICS}}
    others = sorted({str(r["dataset"]) for r in latest.values()} - {str(newest_dataset)})
    if others:
        log.warning("study %r also holds runs on %s: reporting those on %s (its latest); give a study on another "
                    "dataset a name of its own (--name)", study, ", ".join(others), newest_dataset)
    return [r for r in latest.values() if r["dataset"] == newest_dataset]


def table(records: list[dict], columns: list[tuple[str, str]] = RATING_COLUMNS) -> list[dict]:
    """Per protocol and row (the figures' extra runs excluded): each column's mean and CI over the folds."""
    groups = defaultdict(list)
    for r in records:
        if not r["figure"]:
            groups[(r["protocol"], r["row"])].append(r)
    order = list(LABELS)

    def position(key: tuple[str, str]) -> tuple[str, int]:  # by protocol, then in the study's row order
        protocol, row = key
        return protocol, order.index(row) if row in order else len(order)

    out = []
    for (protocol, row), rs in sorted(groups.items(), key=lambda kv: position(kv[0])):
        line = {"protocol": protocol, "row": row, "model": LABELS.get(row, row), "folds": len(rs)}
        if len({math.isnan(r[TEST_RMSE_BEFORE_REFIT]) for r in rs}) > 1:
            log.warning("%s at %s: some folds were run with refit=true and some without; its test RMSE mixes "
                        "the two", row, protocol)
        for m, name in columns:
            line[name], line[f"{name}_ci"] = mean_ci([r[m] for r in rs])
        out.append(line)
    return out


def pm(mean: float, ci: float, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")


def markdown(rows: list[dict], study: str, footer: str) -> str:
    refit = any(not math.isnan(r["rmse_before_refit"]) for r in rows)  # a column only where some row has it

    def before_refit(r):  # blank for a row run without refit
        if not refit:
            return ""
        mean, ci = r["rmse_before_refit"], r["rmse_before_refit_ci"]
        return ("" if math.isnan(mean) else pm(mean, ci, 4)) + " | "

    header = ["model", "row", "folds", "test RMSE", *(["before refit"] if refit else []), "training time (s)",
              "epochs", "Recall@10", "NDCG@10"]
    lines = [f"# Study `{study}`: test RMSE on the 1..5 scale, mean ± 95% CI over folds (t distribution)", ""]
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        lines += [f"## Protocol {protocol.replace('-', ':')}", "", "| " + " | ".join(header) + " |",
                  "| --- | --- |" + " ---: |" * (len(header) - 2)]
        for r in (r for r in rows if r["protocol"] == protocol):
            lines.append(f"| {r['model']} | `{r['row']}` | {r['folds']} | {pm(r['rmse'], r['rmse_ci'], 4)} | "
                         f"{before_refit(r)}{pm(r['time_s'], r['time_s_ci'], 1)} | {r['epochs']:.0f} | "
                         f"{pm(r['recall_at_10'], r['recall_at_10_ci'], 4)} | "
                         f"{pm(r['ndcg_at_10'], r['ndcg_at_10_ci'], 4)} |")
        lines.append("")
    lines += ["Recall@10 and NDCG@10: per user, every item not rated in the training and validation parts is "
              "ranked; relevant = held-out ratings >= 4 (cfae/ranking.py). Training time: fit wall time on "
              "the machine that ran the study, validation included." + (
                  " With refit=true, test RMSE is the model's trained anew on the training and validation parts "
                  "for the epochs validation chose (its time included); before refit: the model validation "
                  "chose." if refit else ""), "",
              "Runs and commands: " + footer.replace("\n", "; ") + ".", ""]
    return "\n".join(lines)


def ranking_markdown(rows: list[dict], study: str, footer: str) -> str:
    header = ["model", "row", "folds", "NDCG@100", "Recall@20", "Recall@50", "training time (s)", "epochs"]
    lines = [f"# Study `{study}`: top-N from clicks, vae_cf's protocol, mean ± 95% CI over draws of the held-out "
             "users (t distribution)", ""]
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        lines += [f"## {protocol}", "", "| " + " | ".join(header) + " |",
                  "| --- | --- |" + " ---: |" * (len(header) - 2)]
        for r in (r for r in rows if r["protocol"] == protocol):
            cells = [pm(r[name], r[f"{name}_ci"], 4) for name in ("ndcg_at_100", "recall_at_20", "recall_at_50")]
            lines.append(f"| {r['model']} | `{r['row']}` | {r['folds']} | {' | '.join(cells)} | "
                         f"{pm(r['time_s'], r['time_s_ci'], 1)} | {r['epochs']:.0f} |")
        lines.append("")
    lines += ["Ratings above 3.5 are clicks; users with fewer than 5 are dropped; held-out users' clicks are split "
              "80/20 into input and scored (data.split=users, cfae/data/splits.py); NDCG@100 and Recall@k rank every "
              "item the user was not given (cfae/metrics.py). Validation's NDCG@100 chose each model's epoch. "
              "Training time: fit wall time, validation included.", "",
              "Runs and commands: " + footer.replace("\n", "; ") + ".", ""]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# -- figures ---------------------------------------------------------------------------------------------
def provenance(records: list[dict], command: str) -> str:
    """Where and when the runs ran and the commands that made them: the line under every figure."""
    machines = " / ".join(sorted({r["machine"] for r in records}))
    dates = sorted({r["date"] for r in records})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    studies = "\n".join(sorted({portable(r["command"]) for r in records if r["command"]})) or "python -m cfae.study"
    return f"{when}; {machines}\n{studies}\n{portable(command)}"


def portable(command: str, here: Path | None = None) -> str:
    """A command as a reader can run it elsewhere: a path under the folder it ran in (`here`, by default the
    current one) relative to it, any other absolute path with its folder as `<dir>` (`sqlite:////home/me/x.db`:
    `sqlite:///<dir>/x.db`)."""
    here = (here or Path.cwd()).resolve()

    def local(path: str) -> str:
        p = Path(path)
        return str(p.relative_to(here)) if p.is_relative_to(here) else f"<dir>/{p.name}"

    def token(word: str) -> str:
        key, eq, value = word.rpartition("=") if "=" in word and not word.startswith("/") else ("", "", word)
        scheme = "sqlite:///" if value.startswith("sqlite:////") else ""
        path = value.removeprefix(scheme)
        if path.startswith("/"):
            value = scheme + local(path)
        return f"{key}{eq}{value}"

    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: leave it as it was written
        return command
    return shlex.join(token(w) for w in words)


def stamp(fig, text: str) -> None:
    """The provenance lines at the foot of a figure, wrapped to its width (6-point text, about 0.55 em a
    character)."""
    width = int(fig.get_figwidth() * 72 / (6 * 0.55)) - 4
    lines = [wrapped for line in text.split("\n") for wrapped in textwrap.wrap(line, width, break_on_hyphens=False)]
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=6, color="0.35", va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.025 * len(lines), 1, 1))


def validation_curve(values: list[float], path: Path, title: str, metric: str = VAL_RMSE,
                     higher_is_better: bool = False) -> Path:
    """One run's validation metric per epoch, zoomed on where the epoch is chosen (the first epochs' values can
    lie far off and would flatten the rest), its best epoch marked."""
    fig = Figure(figsize=(5.5, 3.4))  # no pyplot: a notebook's plotting backend stays as it is
    ax = fig.subplots()
    epochs = np.arange(1, len(values) + 1)
    sign = -1.0 if higher_is_better else 1.0  # the zoom is worked out as if lower were better
    worse = sign * np.asarray(values)
    best = int(np.argmin(worse))
    ax.plot(epochs, values, marker="o", markersize=3)
    ax.plot(epochs[best], values[best], "o", color="C3", label=f"best: {values[best]:.4f} at epoch {best + 1}")
    lowest = worse[best]
    top = min(worse.max(), lowest + max(0.02, 4 * (float(np.median(worse)) - lowest)))
    limits = sign * (lowest - 0.1 * (top - lowest) - 1e-4), sign * (top + 0.05 * (top - lowest) + 1e-4)
    ax.set_ylim(min(limits), max(limits))
    clipped = int((worse > top).sum())
    side = "below the bottom" if higher_is_better else "above the top"
    ax.set(xlabel="epoch", ylabel=metric, title=title + (f"\n({clipped} value{'s' * (clipped > 1)} {side})"
                                                          if clipped else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def knob_value(key: str) -> float:
    """The knob's value a figure run was given, from its study key (`fig3_latent_size/fold0/hidden=300`)."""
    return float(key.rsplit("=", 1)[1])


def knob_figure(records: list[dict], figure: str, xlabel: str, title: str, path: Path, command: str,
                metric: str = TEST_RMSE, ylabel: str = "test RMSE (1..5 scale)") -> bool:
    """A test metric against a knob's value (mean and 95% CI over the figure's folds)."""
    points = defaultdict(list)
    for r in records:
        if r["figure"] == figure:
            points[knob_value(r["key"])].append(r[metric])
    if not points:
        return False
    xs = sorted(points)
    means, cis = zip(*(mean_ci(points[x]) for x in xs))
    fig = Figure(figsize=(5.5, 3.8))  # no pyplot: a notebook's plotting backend stays as it is
    ax = fig.subplots()
    ax.errorbar(xs, means, yerr=[0 if math.isnan(c) else c for c in cis], marker="o", capsize=3)
    for x, m in zip(xs, means):
        ax.annotate(f"{m:.4f}", (x, m), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    folds = sorted({r["fold"] for r in records if r["figure"] == figure})
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title}\n(fold{'s' * (len(folds) > 1)} "
           f"{','.join(map(str, folds))})")
    ax.grid(alpha=0.3)
    stamp(fig, provenance([r for r in records if r["figure"] == figure], command))
    fig.savefig(path, dpi=120)
    return True


def curves_figure(client, arms: list[tuple[str, dict | None]], title: str, path: Path, command: str) -> bool:
    """Validation RMSE per epoch of each arm's run, its test RMSE in the legend (not drawn, False, if an
    arm's run is missing)."""
    if any(r is None for _, r in arms):
        return False
    fig = Figure(figsize=(5.5, 3.8))  # no pyplot: a notebook's plotting backend stays as it is
    ax = fig.subplots()
    lowest = math.inf
    for label, r in arms:
        history = sorted(client.get_metric_history(r["run_id"], VAL_RMSE), key=lambda m: (m.step, m.timestamp))
        values = [m.value for m in history]
        lowest = min(lowest, *values)
        ax.plot(range(1, len(values) + 1), values, label=f"{label}: test {r['test/rmse']:.4f}")
    ax.set_ylim(lowest - 0.01, lowest * 1.12)  # the first epochs' high values would flatten the rest
    ax.set(xlabel="epoch", ylabel="validation RMSE (1..5 scale)", title=f"{title} (fold {arms[0][1]['fold']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    stamp(fig, provenance([r for _, r in arms], command))
    fig.savefig(path, dpi=120)
    return True


def figures(client, records: list[dict], out: Path, command: str) -> dict[str, bool]:
    """Figures 3-8, each stamped with its own runs' date, machine and commands."""
    # the figures' protocol and first fold: those of the figure runs, else the table's first
    protocol = next((r["protocol"] for r in records if r["figure"]), records[0]["protocol"])
    figure_folds = sorted({r["fold"] for r in records if r["figure"]}) or [0]

    def row_run(row: str) -> dict | None:  # a table row's run on the figures' first fold
        return next((r for r in records if r["row"] == row and not r["figure"] and r["protocol"] == protocol
                     and r["fold"] == figure_folds[0]), None)

    def figure_run(figure: str) -> dict | None:
        return next((r for r in records if r["figure"] == figure and r["fold"] == figure_folds[0]), None)

    return {
        "fig3_latent_size.png": knob_figure(records, "fig3_latent_size", "latent size",
                                            "Fig. 3: single hidden layer AE", out / "fig3_latent_size.png", command),
        "fig4_denoising.png": knob_figure(records, "fig4_denoising", "noise (fraction of input ratings dropped)",
                                          "Fig. 4: denoising AE", out / "fig4_denoising.png", command),
        "fig5_deep.png": curves_figure(client, [("AutoRec 500", row_run("autorec")),
                                                ("deep 300,500,750", row_run("deep"))],
                                       "Fig. 5: deep vs shallow", out / "fig5_deep.png", command),
        "fig6_refeeding.png": curves_figure(client, [("deep 300,500,750", row_run("deep")),
                                                     ("+ dense re-feeding", figure_run("fig6_refeeding"))],
                                            "Fig. 6: dense re-feeding", out / "fig6_refeeding.png", command),
        "fig7_batch_norm.png": curves_figure(client, [("deep 500,700", figure_run("fig7_batch_norm")),
                                                      ("+ batch norm", row_run("deep_bn"))],
                                             "Fig. 7: batch normalisation", out / "fig7_batch_norm.png", command),
        "fig8_vae.png": curves_figure(client, [("VAE 500,200", row_run("vae")), ("AutoRec 500", row_run("autorec"))],
                                      "Fig. 8: variational AE", out / "fig8_vae.png", command),
    }


def ranking_figures(records: list[dict], out: Path, command: str) -> dict[str, bool]:
    """The ranking plan's figure (conf/study_ranking.yaml): Mult-VAE's test NDCG@100 against its latent size."""
    return {"ranking_latent_size.png": knob_figure(
        records, "ranking_latent_size", "latent size (the code)", "Mult-VAE: NDCG@100 against the latent size",
        out / "ranking_latent_size.png", command, "test/ndcg_at_100", "test NDCG@100")}


def figure_note(drawn: dict[str, bool]) -> str:
    """What the report says of the figures it could not draw: nothing for a study with none of their runs (a
    plan without figures, such as the kernel models'), their names when only some are there."""
    missing = [name for name, ok in drawn.items() if not ok]
    if not any(drawn.values()):
        return "\nNo figures: the study has none of the figures' runs.\n"
    return f"\nMissing figures (their runs are not in the store): {', '.join(missing)}\n" if missing else ""


def report(study: str = "study", out: str | Path = "reports", uri: str | None = None,
           experiment_name: str = "cfae", log_to_mlflow: bool = True, command: str = "python -m cfae.report") -> dict:
    """Write the study's table (Markdown, CSV) and figures to `out`; returns what was written."""
    client, experiment_id = mlflow_client(uri, experiment_name)
    records = load_runs(client, experiment_id, study)
    if not records:
        raise SystemExit(f"no finished runs of study {study!r} in {client.tracking_uri}: run python -m cfae.study")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    footer = provenance(records, command)
    if all(math.isnan(r[TEST_RMSE]) for r in records):  # task=ranking
        rows = table(records, RANKING_COLUMNS)
        drawn = ranking_figures(records, out, command)
        text = ranking_markdown(rows, study, footer)
    else:
        rows = table(records)
        drawn = figures(client, records, out, command)
        text = markdown(rows, study, footer)
    missing = [name for name, ok in drawn.items() if not ok]
    text += "\n".join(f"![{name}]({name})" for name, ok in drawn.items() if ok) + "\n" + figure_note(drawn)
    (out / f"{study}.md").write_text(text)
    write_csv(rows, out / f"{study}.csv")
    files = [out / f"{study}.md", out / f"{study}.csv", *(out / n for n, ok in drawn.items() if ok)]
    if log_to_mlflow:
        run = client.create_run(experiment_id, run_name=f"report-{study}", tags={"cfae.report": study})
        for f in files:
            client.log_artifact(run.info.run_id, str(f))
        for r in rows:
            headline = "rmse" if "rmse" in r else "ndcg_at_100"
            client.log_metric(run.info.run_id, f"{r['protocol']}/{r['row']}/test_{headline}", r[headline])
        client.set_terminated(run.info.run_id)
    log.info("study %r: %d runs, %d table rows, figures %d/%d -> %s", study, len(records), len(rows),
             len(drawn) - len(missing), len(drawn), out)
    return {"rows": rows, "files": files, "missing": missing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="study")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or mlruns/mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    command = shlex.join(["python", "-m", "cfae.report", *(argv if argv is not None else sys.argv[1:])])
    result = report(args.study, args.out, args.uri, log_to_mlflow=not args.no_mlflow, command=command)
    print((Path(args.out) / f"{args.study}.md").read_text())
    return 1 if result["missing"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
