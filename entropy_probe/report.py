"""The final report: summary.json (every number plus provenance), a text table and the plot of
ΔH(η) and δH₁(η) against η; the comparison of update variants (a table and a plot)."""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path


def provenance() -> dict:
    """Package version and git commit of the code that produced the numbers."""
    try:
        version = metadata.version("entropy-probe")
    except metadata.PackageNotFoundError:
        version = "not installed"
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown (not a git checkout)", False
    return {"package_version": version, "git_commit": commit, "git_dirty": dirty}


U_SE_SOURCE = "influence over the U batch's prompt groups (B_U − 1 degrees of freedom; entropy_probe/attribution.py)"


def combine(first_order: dict, snis: dict, x_dot_v_se_u: float | None = None, exact: dict | None = None) -> list[dict]:
    """One row per η of the sweep: δH₁ with its E-side SE and, when the U-batch SE of X·v is given
    (the attribution stage's influence SE), its U-side and total SE (E and U batches are
    independent, so variances add); ΔH ± SE, the ratio δH₁/ΔH, the central difference
    (ΔH(η) − ΔH(−η))/2 when −η was measured, ESS, and the exact ΔH when known."""
    measured = {row["eta"]: row for row in snis["rows"]}
    rows = []
    for pred in first_order["delta_h1"]:
        eta = pred["eta"]
        row = {"eta": eta, "delta_h1": pred["delta_h1"], "delta_h1_se": pred["se"]}
        if x_dot_v_se_u is not None:
            se_u = abs(eta) * x_dot_v_se_u
            row |= {"delta_h1_se_u": se_u, "delta_h1_se_total": (pred["se"] ** 2 + se_u**2) ** 0.5}
        if eta in measured:
            m = measured[eta]
            row |= {"delta_h": m["delta_h"], "delta_h_se": m["se"], "ess": m["ess"],
                    "num_sequences": m["num_sequences"], "own_nucleus_differs_share": m["own_nucleus_differs_share"],
                    "log_weight_range": [m["log_weight_min"], m["log_weight_max"]],
                    "ratio_delta_h1_over_delta_h": pred["delta_h1"] / m["delta_h"] if m["delta_h"] != 0 else None}
        if -eta in measured and eta in measured:
            row["central_difference"] = (measured[eta]["delta_h"] - measured[-eta]["delta_h"]) / 2
        if exact is not None and eta in exact:
            row["exact_delta_h"] = exact[eta]
        rows.append(row)
    return rows


def u_batch_note(u_batch: dict) -> str:
    """One line on the U batch's signal; says so when v carries no gradient from it."""
    line = (f"U batch: {u_batch['informative_groups']} of {u_batch['num_groups']} prompt groups have non-zero "
            f"advantages; loss {u_batch['loss_type']}: {u_batch['loss_formula']}")
    if u_batch["informative_groups"] == 0:
        line += ("\nNOTE: no prompt group of the U batch has a non-zero advantage: v carries no gradient from this "
                 "batch (it is the optimizer state's momentum and weight decay alone)")
    return line


def format_table(rows: list[dict], unit: str, u_batch: dict | None = None) -> str:
    def f(x, spec=".4g"):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    header = (f"{'eta':>9} {'δH₁':>11} {'±E':>8} {'±E+U':>8} {'ΔH (SNIS)':>11} {'±':>8} {'δH₁/ΔH':>8} "
              f"{'central':>11} {'ESS':>7} {'exact ΔH':>11}")
    lines = [f"Entropy change of one update step ({unit}). ±E: E-batch noise with v fixed; "
             "±E+U: also the U-batch noise in v (influence over U prompt groups); exact: by enumeration", header]
    for r in rows:
        lines.append(
            f"{f(r['eta']):>9} {f(r['delta_h1']):>11} {f(r['delta_h1_se'], '.2g'):>8} "
            f"{f(r.get('delta_h1_se_total'), '.2g'):>8} {f(r.get('delta_h')):>11} "
            f"{f(r.get('delta_h_se'), '.2g'):>8} {f(r.get('ratio_delta_h1_over_delta_h'), '.3f'):>8} "
            f"{f(r.get('central_difference')):>11} {f(r.get('ess'), '.1f'):>7} {f(r.get('exact_delta_h')):>11}"
        )
    if u_batch is not None:
        lines.append(u_batch_note(u_batch))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path, unit: str) -> None:
    """Left: |ΔH| (with 1-SE bars) and |δH₁| against η, log–log. Right: δH₁/ΔH against η."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["eta"] > 0]
    eta = [r["eta"] for r in rows]
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.errorbar(eta, [abs(r["delta_h1"]) for r in rows], yerr=[r.get("delta_h1_se_total", r["delta_h1_se"]) for r in rows], marker="o",
                capsize=3, label="|δH₁| = |η·X·v| (first order)")
    measured = [r for r in rows if "delta_h" in r]
    if measured:
        ax.errorbar([r["eta"] for r in measured], [abs(r["delta_h"]) for r in measured],
                    yerr=[r["delta_h_se"] for r in measured], marker="s", capsize=3, label="|ΔH| (SNIS)")
    exact = [r for r in rows if "exact_delta_h" in r]
    if exact:
        ax.plot([r["eta"] for r in exact], [abs(r["exact_delta_h"]) for r in exact], "k--", label="|ΔH| exact")
    ax.set(xscale="log", yscale="log", xlabel="learning rate η", ylabel=f"|entropy change| ({unit})",
           title="Entropy change of one step")
    ax.legend()
    ratios = [r for r in measured if r.get("ratio_delta_h1_over_delta_h") is not None]
    ax_ratio.plot([r["eta"] for r in ratios], [r["ratio_delta_h1_over_delta_h"] for r in ratios], "o-")
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    ax_ratio.set(xscale="log", xlabel="learning rate η", ylabel="δH₁ / ΔH", title="linearity (→ 1 as η → 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- update variants

def variant_result(name: str, overrides: str, first_order: dict, snis: dict, v_meta: dict) -> dict:
    """One variant's numbers for the comparison: X·v ± E-side SE, |v|, cos(X, v), and per η δH₁ ± SE
    beside the SNIS ΔH ± SE (``first_order``: :func:`first_order.first_order_report`, ``snis``:
    :func:`snis.delta_h_sweep`, ``v_meta``: the v shard's header)."""
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
             "noise, v fixed) and the SNIS ΔH(η) at θ + η·v", "",
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
