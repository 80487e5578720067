"""The benchmark table (rich), one row per engine, every figure also a ratio to the same run's baseline."""

from __future__ import annotations

#: The offline columns name their statistic: both show the best round (the median and range follow in the cells
#: and the spread column), so a row's pairs/s and fraction are one measurement and rank engines alike.
OFFLINE, ROOFLINE = "offline pairs/s (best round)", "roofline (best round)"


def _fmt(d: dict, key: str, fmt: str = "{:.1f}") -> str:
    return fmt.format(d[key]) if key in d else "-"


def _fraction(d: dict) -> str:
    """The best round's paired roofline fraction (the round whose pairs/s the row shows), then the median and range
    of every round's; a result written before the best round's was kept shows its median and range only."""
    if "roofline_fraction" not in d:
        return "-"
    rounds = d.get("roofline_fraction_rounds") or [d["roofline_fraction"]]
    spread = f"{min(rounds):.2f}-{max(rounds):.2f}"
    if "roofline_fraction_best_round" not in d:
        return f"{d['roofline_fraction']:.2f} ({spread})"
    return f"{d['roofline_fraction_best_round']:.2f} (median {d['roofline_fraction']:.2f}, {spread})"


def _first_request(row: dict) -> str:
    """First request ÷ the same request's median warm latency, and the range against each round's warm one (the
    first request itself is one sample: a process has one)."""
    first = row.get("first_request") or {}
    if "ratio" not in first:
        return "-"
    low, high = first.get("ratio_range", (first["ratio"],) * 2)
    return f"{first['ratio']:.2f}x ({low:.2f}-{high:.2f})"


def _latency(d: dict, high: str = "p95_ms") -> str:
    """`p50/p95` (or `p50/p99`) in ms, `-` for a part not measured; empty when `d` holds no measurement."""
    return f"{_fmt(d, 'p50_ms', '{:.0f}')}/{_fmt(d, high, '{:.0f}')}" if d else "-"


def table(result: dict):
    """The rich table of a bench result. Each row is built by column heading, so a figure lands under the heading
    that says what it is (the baseline's offline p50/p95 sat under "HTTP p50/p95 ms", by position)."""
    from rich.table import Table

    base = result["baseline"]["pairs_per_s"]
    wl, conc = result["workload"], result["concurrency"]
    ref_ndcg = result.get("reference_ndcg@10")
    b = result["baseline"]
    t = Table(title=f"openrerank bench ({result['model']['name']}): {wl['requests']} requests x "
              f"{wl['passages_per_request']} passages = {wl['pairs']} pairs; baseline {b['name']} = {base:.1f} "
              f"pairs/s (best of {len(b['rounds_pairs_per_s'])} rounds, spread {b['spread']:.0%}); load "
              f"{result['machine']['load_average_start']} -> {result['machine'].get('load_average_end')}")
    roof = result.get("roofline")
    if roof:
        low, high = roof.get("gemm_gflops_range", (roof["gemm_gflops"],) * 2)
        library = f"{roof['gemm_library']}'s " if roof.get("gemm_library") else ""  # older results: torch's
        t.caption = (f"fp32 roofline: {roof['gemm_gflops']:.1f} GFLOP/s {library}fp32 GEMM (median; "
                     f"{low:.0f}-{high:.0f}) on "
                     f"{roof['threads']} threads / {roof['gflop_per_pair']:.2f} GFLOP per pair "
                     f"({roof['mean_tokens']:.0f} tokens) = {roof['pairs_per_s']:.1f} pairs/s; the roofline column "
                     "is the best round's fraction (the round of the pairs/s shown), then the median and range of "
                     "every round's, each against the GEMM timed either side of it; first req. is one first "
                     "request ÷ that request's median warm latency over the rounds (range: against each round's) "
                     "(docs/engine.md)")
    clients, clients_latency = f"{conc['clients']} clients pairs/s", f"{conc['clients']}c p50/p99 ms"
    cols = ["engine", OFFLINE, "offline p50/p95 ms", ROOFLINE, "first req.", "spread", "HTTP pairs/s",
            "HTTP p50/p95 ms", "model share", clients, clients_latency, "fail", "corr vs fp32", "max|Δ|",
            "default nDCG@10", "faithful"]
    for c in cols:
        t.add_column(c, justify="right")
    rows: list[dict[str, str]] = [{  # the baseline runs in-process only: no HTTP, no concurrent clients
        "engine": "baseline", OFFLINE: f"{base:.1f} (1.00x)", "offline p50/p95 ms": _latency(b),
        ROOFLINE: _fraction(b), "spread": f"{b['spread']:.0%}", "corr vs fp32": "1", "max|Δ|": "0",
        "default nDCG@10": f"{ref_ndcg:.4f}" if ref_ndcg is not None else "-"}]
    for row in result["backends"]:
        name = row["name"] + (" (auto)" if row.get("auto") else "")
        if row.get("error") and not row.get("offline"):
            rows.append({"engine": name, OFFLINE: f"error: {row['error'][:60]}"})
            continue
        off, http, cc = row.get("offline", {}), row.get("http", {}), row.get("concurrent", {})
        agreement = row.get("agreement", {})
        gate = row.get("faithful")
        rows.append({
            "engine": name,
            OFFLINE: f"{off['pairs_per_s']:.1f} ({off['pairs_per_s'] / base:.2f}x)" if off else "-",
            "offline p50/p95 ms": _latency(off),
            ROOFLINE: _fraction(row),
            "first req.": _first_request(row),
            "spread": _fmt(off, "spread", "{:.0%}"),
            "HTTP pairs/s": f"{http['pairs_per_s']:.1f} ({http['pairs_per_s'] / base:.2f}x)" if http else "-",
            "HTTP p50/p95 ms": _latency(http),
            "model share": _fmt(http, "model_share", "{:.1%}"),
            clients: f"{cc['pairs_per_s']:.1f} ({cc['pairs_per_s'] / off['pairs_per_s']:.2f}x off.)"
            if cc and off else "-",
            clients_latency: _latency(cc, "p99_ms"),
            "fail": _fmt(cc, "failures", "{}"),
            "corr vs fp32": _fmt(agreement, "correlation", "{:.6f}"),
            "max|Δ|": _fmt(agreement, "max_abs_diff", "{:.1e}"),
            "default nDCG@10": _fmt(row, "default_ndcg@10", "{:.4f}"),
            "faithful": "-" if gate is None else ("yes" if gate else "no"),
        })
    for cells in rows:
        assert set(cells) <= set(cols), set(cells) - set(cols)  # a cell under no heading is a bug here
        t.add_row(*(cells.get(c, "") for c in cols))
    return t


def render(result: dict) -> None:
    from rich.console import Console

    Console(width=max(Console().width, 200)).print(table(result))
