"""The comparison of update variants (update.variants): one table and one plot of each variant's
X·v and of δH₁(η) beside the SNIS ΔH(η), the main update first."""
from __future__ import annotations

from pathlib import Path

from .report import combine


def variant_result(name: str, overrides: str, first_order: dict, snis: dict | None, v_meta: dict) -> dict:
    """One variant's numbers for the comparison: X·v ± E-side SE, |v|, cos(X, v), and per η δH₁ ± SE
    beside the SNIS ΔH ± SE (``first_order``: :func:`first_order.first_order_report`, ``snis``:
    :func:`snis.delta_h_sweep`, None for a variant without ``snis: true``; ``v_meta``: the v
    shard's header)."""
    return {"name": name, "overrides": overrides, "optimizer": v_meta.get("optimizer"),
            "loss_type": v_meta.get("loss_type"), "lr_factor": v_meta.get("lr_factor", 1.0),
            "X_dot_v": first_order["X_dot_v"], "X_dot_v_se": first_order["X_dot_v_se"],
            "v_norm": first_order["v_norm"], "cosine_X_v": first_order["cosine_X_v"],
            "rows": combine(first_order, snis)}


def format_variants(results: list[dict], unit: str) -> str:
    """One table comparing the update variants (the main update first)."""
    def f(x, spec=".4g"):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    lines = [f"Update variants on the same E batch and X ({unit}): v of each rule, δH₁(η) = η·X·v (±E: E-batch "
             "noise, v fixed) and the SNIS ΔH(η) at θ + η·v (\"-\" for a variant without snis: true)", "",
             f"{'variant':<12} {'X·v':>11} {'±E':>8} {'|v|':>9} {'cos(X,v)':>9}  overrides"]
    lines += [f"{r['name']:<12} {f(r['X_dot_v']):>11} {f(r['X_dot_v_se'], '.2g'):>8} {f(r['v_norm']):>9} "
              f"{f(r['cosine_X_v'], '.3f'):>9}  {r['overrides']}" for r in results]
    lines += ["", f"{'eta':>9} {'variant':<12} {'δH₁':>11} {'±E':>8} {'ΔH (SNIS)':>11} {'±':>8} {'δH₁/ΔH':>8} "
              f"{'ESS':>7}"]
    etas = [row["eta"] for row in results[0]["rows"]]
    for i, eta in enumerate(etas):
        for r in results:
            row = r["rows"][i]
            lines.append(f"{f(eta):>9} {r['name']:<12} {f(row['delta_h1']):>11} {f(row['delta_h1_se'], '.2g'):>8} "
                         f"{f(row.get('delta_h')):>11} {f(row.get('delta_h_se'), '.2g'):>8} "
                         f"{f(row.get('ratio_delta_h1_over_delta_h'), '.3f'):>8} {f(row.get('ess'), '.1f'):>7}")
    return "\n".join(lines) + "\n"


def plot_variants(results: list[dict], path: str | Path, unit: str) -> None:
    """Left: |δH₁(η)| (lines) and |ΔH(η)| (SNIS, markers with 1-SE bars; hollow where ΔH > 0) of each
    variant against η, log–log. Right: X·v ± E-side SE per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_bar) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, r in enumerate(results):
        color = colors[k % len(colors)]
        rows = [row for row in r["rows"] if row["eta"] > 0]
        ax.plot([row["eta"] for row in rows], [abs(row["delta_h1"]) for row in rows], "-", color=color,
                label=f"{r['name']}: |δH₁|")
        measured = [row for row in rows if "delta_h" in row]
        for row in measured:
            ax.errorbar([row["eta"]], [abs(row["delta_h"])], yerr=[row["delta_h_se"]], fmt="o", color=color,
                        mfc=color if row["delta_h"] < 0 else "none", capsize=3)
    ax.set(xscale="log", yscale="log", xlabel="learning rate η", ylabel=f"|entropy change| ({unit})",
           title="Update variants: |δH₁| (lines), |ΔH| SNIS (dots; hollow: ΔH > 0)")
    ax.legend(fontsize=8)
    names = [r["name"] for r in results]
    ax_bar.bar(names, [r["X_dot_v"] for r in results], yerr=[r["X_dot_v_se"] for r in results], capsize=4,
               color=[colors[k % len(colors)] for k in range(len(results))])
    ax_bar.axhline(0.0, color="gray", lw=0.8)
    ax_bar.set(ylabel=f"X·v ({unit} per unit η)", title="δH₁/η = X·v per variant")
    ax_bar.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
