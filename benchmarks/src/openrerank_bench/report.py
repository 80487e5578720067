"""The benchmark table (rich), one row per engine, every figure also a ratio to the same run's baseline."""

from __future__ import annotations


def _fmt(d: dict, key: str, fmt: str = "{:.1f}") -> str:
    return fmt.format(d[key]) if key in d else "-"


def _fraction(d: dict) -> str:
    """The median paired roofline fraction and the range of its rounds."""
    if "roofline_fraction" not in d:
        return "-"
    rounds = d.get("roofline_fraction_rounds") or [d["roofline_fraction"]]
    return f"{d['roofline_fraction']:.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def render(result: dict) -> None:
    from rich.console import Console
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
        t.caption = (f"fp32 roofline: {roof['gemm_gflops']:.1f} GFLOP/s fp32 GEMM (median; {low:.0f}-{high:.0f}) on "
                     f"{roof['threads']} threads / {roof['gflop_per_pair']:.2f} GFLOP per pair "
                     f"({roof['mean_tokens']:.0f} tokens) = {roof['pairs_per_s']:.1f} pairs/s; the roofline column "
                     "is the median of per-round fractions, each against the GEMM timed either side of it, with "
                     "their range (docs/engine.md)")
    cols = ["engine", "offline pairs/s", "roofline", "first req.", "spread", "HTTP pairs/s", "HTTP p50/p95 ms",
            "model share",
            f"{conc['clients']} clients pairs/s", f"{conc['clients']}c p50/p99 ms", "fail", "corr vs fp32",
            "max|Δ|", "default nDCG@10", "faithful"]
    for c in cols:
        t.add_column(c, justify="right")
    t.add_row("baseline", f"{base:.1f} (1.00x)", _fraction(b), "", f"{b['spread']:.0%}", "",
              f"{b['p50_ms']:.0f}/{b['p95_ms']:.0f}", "", "", "", "", "1", "0",
              f"{ref_ndcg:.4f}" if ref_ndcg is not None else "-", "")
    for row in result["backends"]:
        name = row["name"] + (" (auto)" if row.get("auto") else "")
        if row.get("error") and not row.get("offline"):
            t.add_row(name, f"error: {row['error'][:60]}", *[""] * (len(cols) - 2))
            continue
        off, http, cc = row.get("offline", {}), row.get("http", {}), row.get("concurrent", {})
        agreement = row.get("agreement", {})
        gate = row.get("faithful")
        t.add_row(
            name, f"{off['pairs_per_s']:.1f} ({off['pairs_per_s'] / base:.2f}x)" if off else "-",
            _fraction(row),
            _fmt(row.get("first_request", {}), "ratio", "{:.2f}x"),
            _fmt(off, "spread", "{:.0%}"),
            f"{http['pairs_per_s']:.1f} ({http['pairs_per_s'] / base:.2f}x)" if http else "-",
            f"{_fmt(http, 'p50_ms', '{:.0f}')}/{_fmt(http, 'p95_ms', '{:.0f}')}",
            _fmt(http, "model_share", "{:.1%}"),
            f"{cc['pairs_per_s']:.1f} ({cc['pairs_per_s'] / off['pairs_per_s']:.2f}x off.)" if cc and off else "-",
            f"{_fmt(cc, 'p50_ms', '{:.0f}')}/{_fmt(cc, 'p99_ms', '{:.0f}')}", _fmt(cc, "failures", "{}"),
            _fmt(agreement, "correlation", "{:.6f}"), _fmt(agreement, "max_abs_diff", "{:.1e}"),
            _fmt(row, "default_ndcg@10", "{:.4f}"), "-" if gate is None else ("yes" if gate else "no"),
        )
    Console(width=max(Console().width, 200)).print(t)
