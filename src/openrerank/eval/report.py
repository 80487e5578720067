"""Present the table: rich terminal tables, JSON, CSV and a bar chart (PNG)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from openrerank.eval.pipeline import DatasetResult

_PRETTY = {
    "sparse": "Sparse", "sparse+rerank": "Sparse+Rerank", "dense": "Dense", "dense+rerank": "Dense+Rerank",
    "hybrid": "Dense+Sparse", "hybrid+rerank": "Dense+Sparse+Rerank",
}


def pretty(pipeline: str) -> str:
    return _PRETTY.get(pipeline, pipeline)


def metric_names(results: list[DatasetResult]) -> list[str]:
    names: list[str] = []
    for res in results:
        for row in res.rows:
            names.extend(m for m in row.metrics if m not in names)
    return names


def pipeline_names(results: list[DatasetResult]) -> list[str]:
    names: list[str] = []
    for res in results:
        names.extend(r.pipeline for r in res.rows if r.pipeline not in names)
    return names


def average_rows(results: list[DatasetResult]) -> list[dict]:
    """Mean of each metric over the datasets that have the pipeline (run-file rows exist for one dataset only);
    seconds are summed."""
    rows = []
    for p in pipeline_names(results):
        have = [row for res in results for row in res.rows if row.pipeline == p]
        metrics = {m: sum(r.metrics[m] for r in have) / len(have) for m in have[0].metrics}
        seconds: dict[str, float] = {}
        for r in have:
            for k, v in r.seconds.items():
                seconds[k] = round(seconds.get(k, 0.0) + v, 3)
        rows.append({"pipeline": p, "metrics": metrics, "seconds": seconds, "datasets": len(have)})
    return rows


def to_json(results: list[DatasetResult], config: dict | None = None) -> dict:
    """One dataset: `{"dataset", "rows", ...}`. Several: `rows` are the averages, `per_dataset` the tables."""
    if len(results) == 1:
        out = results[0].as_dict()
    else:
        out = {"dataset": "average(" + ",".join(r.dataset for r in results) + ")",
               "rows": average_rows(results), "per_dataset": [r.as_dict() for r in results]}
    if config is not None:
        out["config"] = config
    return out


def write_json(results: list[DatasetResult], path: Path, config: dict | None = None) -> None:
    Path(path).write_text(json.dumps(to_json(results, config), indent=2) + "\n", encoding="utf-8")


def write_csv(results: list[DatasetResult], path: Path) -> None:
    """Wide CSV: one line per (dataset, pipeline) plus `average` lines when there are several datasets."""
    metrics = metric_names(results)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "split", "pipeline", *metrics, "seconds_total"])
        for res in results:
            for row in res.rows:
                w.writerow([res.dataset, res.split, row.pipeline, *(f"{row.metrics[m]:.4f}" for m in metrics),
                            f"{row.seconds.get('total', 0.0):.2f}"])
        if len(results) > 1:
            for row in average_rows(results):
                w.writerow(["average", "", row["pipeline"], *(f"{row['metrics'][m]:.4f}" for m in metrics),
                            f"{row['seconds'].get('total', 0.0):.2f}"])


def print_tables(results: list[DatasetResult], console: Console | None = None) -> None:
    console = console or Console()
    metrics = metric_names(results)
    for res in results:
        t = Table(title=f"{res.dataset} ({res.split}, {res.queries} queries, {res.docs:,} docs, "
                        f"relevant = grade >= {res.rel_threshold})")
        t.add_column("pipeline")
        for m in metrics:
            t.add_column(m, justify="right")
        t.add_column("seconds", justify="right")
        for row in res.rows:
            t.add_row(pretty(row.pipeline), *(f"{row.metrics[m]:.4f}" for m in metrics),
                      f"{row.seconds.get('total', 0.0):.1f}")
        console.print(t)
        for note in res.notes:
            console.print(f"  [dim]{note}[/dim]")
        st = Table(title=f"{res.dataset}: where the time went (each stage once)", show_header=True)
        st.add_column("stage")
        st.add_column("seconds", justify="right")
        for stage, sec in sorted(res.stages.items(), key=lambda x: -x[1]):
            st.add_row(stage, f"{sec:.2f}")
        console.print(st)
    if len(results) > 1:
        t = Table(title="per dataset and average")
        t.add_column("pipeline")
        for m in metrics:
            for res in results:
                t.add_column(f"{m}\n{res.dataset}", justify="right")
            t.add_column(f"{m}\naverage", justify="right")
        for avg in average_rows(results):
            cells = []
            for m in metrics:
                for res in results:
                    row = next((r for r in res.rows if r.pipeline == avg["pipeline"]), None)
                    cells.append(f"{row.metrics[m]:.4f}" if row else "-")
                cells.append(f"{avg['metrics'][m]:.4f}")
            t.add_row(pretty(avg["pipeline"]), *cells)
        console.print(t)


def write_plot(results: list[DatasetResult], path: Path) -> None:
    """Grouped bars: one panel per dataset (plus the average), metrics on the x axis, one bar per pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = metric_names(results)
    panels = [(f"{r.dataset} ({r.split})", {row.pipeline: row.metrics for row in r.rows}) for r in results]
    if len(results) > 1:
        panels.append(("average", {row["pipeline"]: row["metrics"] for row in average_rows(results)}))
    pipes = pipeline_names(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 1.6 * len(metrics) + 3) * len(panels), 4.8),
                             squeeze=False)
    width = 0.8 / max(1, len(pipes))
    x = np.arange(len(metrics))
    cmap = plt.get_cmap("tab10")
    for ax, (title, table) in zip(axes[0], panels, strict=True):
        for i, p in enumerate(pipes):
            if p not in table:
                continue
            vals = [table[p][m] for m in metrics]
            bars = ax.bar(x + (i - (len(pipes) - 1) / 2) * width, vals, width, label=pretty(p), color=cmap(i % 10))
            ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
        ax.set_xticks(x, metrics)
        ax.set_ylim(0, 1.1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
