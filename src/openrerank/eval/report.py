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


#: The width tables get where stdout is no terminal (CI, a log file): rich's 80 columns squeezed the
#: multi-dataset table's numbers to `0.…`; a table takes only the width it needs.
PIPED_WIDTH = 1000


def print_tables(results: list[DatasetResult], console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, PIPED_WIDTH))
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


def rerank_pairs(pipelines: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(label, base pipeline, its +rerank pipeline) in table order; either side may be missing."""
    pairs: list[tuple[str, str | None, str | None]] = []
    seen: set[str] = set()
    for p in pipelines:
        base = p.removesuffix("+rerank")
        if base in seen:
            continue
        seen.add(base)
        rerank = f"{base}+rerank"
        pairs.append((pretty(base), base if base in pipelines else None, rerank if rerank in pipelines else None))
    return pairs


def _zoomed_limits(values: list[float]) -> tuple[float, float]:
    """An axis around the values (not from 0: 0.64 vs 0.72 must not look flat), with room for the labels."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, 0.02)
    start = max(0.0, lo - 0.35 * span)
    return start, min(1.0, hi) + 0.45 * span + 0.01


def write_plot(results: list[DatasetResult], path: Path, reranker: str | None = None) -> None:
    """One row per dataset (plus the average), one panel per metric; in each panel a first-stage pipeline and
    the same pipeline reranked sit side by side, values printed at the bar ends, on an axis zoomed to the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_names(results)
    panels = [(f"{r.dataset} ({r.split}, {r.queries} queries)", {row.pipeline: row.metrics for row in r.rows})
              for r in results]
    if len(results) > 1:
        panels.append(("average over datasets", {row["pipeline"]: row["metrics"] for row in average_rows(results)}))
    pairs = rerank_pairs(pipeline_names(results))
    base_color, rerank_color = "#9ecae1", "#08519c"
    height = 0.38
    fig, axes = plt.subplots(len(panels), len(metrics), squeeze=False,
                             figsize=(3.6 * len(metrics) + 1.6, (0.55 * len(pairs) + 1.3) * len(panels)))
    for r, (title, table) in enumerate(panels):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            values = [table[p][metric] for _, b, rr in pairs for p in (b, rr) if p in table]
            for y, (_, base, rerank) in enumerate(pairs):
                for p, offset, color in ((base, -height / 2, base_color), (rerank, height / 2, rerank_color)):
                    if p not in table:
                        continue
                    v = table[p][metric]
                    ax.barh(y + offset, v, height, color=color)
                    ax.text(v, y + offset, f" {v:.3f}", va="center", ha="left", fontsize=9)
            if values:
                ax.set_xlim(*_zoomed_limits(values))
            ax.set_yticks(range(len(pairs)), [label for label, _, _ in pairs] if c == 0 else [""] * len(pairs),
                          fontsize=10)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(metric if len(panels) == 1 else f"{metric}: {title}", fontsize=11)
        if len(panels) > 1:
            axes[r][0].set_ylabel(title, fontsize=10)
    handles = [matplotlib.patches.Patch(color=base_color, label="first stage"),
               matplotlib.patches.Patch(color=rerank_color, label=f"+ rerank ({reranker})" if reranker
                                        else "+ rerank")]
    who = f"reranker: {reranker}" if reranker else "reranked"
    dataset = panels[0][0] if len(panels) == 1 else ", ".join(r.dataset for r in results)
    fig.suptitle(f"{dataset} — first stage vs {who}  (axes zoomed to the values)", fontsize=13)
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
