"""The final report: summary.json (every number plus provenance), a text table and the plot of
ΔH(η) and δH₁(η) against η."""
from __future__ import annotations

import math
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


UPDATE_ACCOUNT = ("optimizer", "loss_type", "training_eta", "training_eta_label", "training_lr", "next_checkpoint",
                  "next_global_step", "steps_between", "step_norm", "optimizer_step")
CHECKPOINT_ACCOUNT = ("path", "kind", "global_step", "learning_rate", "learning_rate_source")


def update_account(v_meta: dict) -> dict:
    """What the report says about v, from its metadata: the optimizer, and for a trainer
    checkpoint its global step, the learning rate of the next step (and its source) and the η at
    which η·v is the trainer's step (entropy_probe.checkpoint_step)."""
    out = {key: v_meta[key] for key in UPDATE_ACCOUNT if key in v_meta}
    if v_meta.get("checkpoint"):
        out["checkpoint"] = {key: v_meta["checkpoint"].get(key) for key in CHECKPOINT_ACCOUNT}
    return out


def is_training_eta(eta: float, update: dict | None) -> bool:
    training = (update or {}).get("training_eta")
    return training is not None and math.isclose(eta, training, rel_tol=1e-9)


def combine(first_order: dict, snis: dict, jackknife: dict | None, exact: dict | None = None) -> list[dict]:
    """One row per η of the sweep: δH₁ with its E-side SE and, when the U jackknife is available,
    its U-side and total SE (E and U batches are independent, so variances add); ΔH ± SE, the
    ratio δH₁/ΔH, the central difference (ΔH(η) − ΔH(−η))/2 when −η was measured, ESS, and the
    exact ΔH when known. The row of the trainer's step (v's training η) says so (``training``)."""
    measured = {row["eta"]: row for row in snis["rows"]}
    update = first_order.get("update")
    rows = []
    for pred in first_order["delta_h1"]:
        eta = pred["eta"]
        row = {"eta": eta, "delta_h1": pred["delta_h1"], "delta_h1_se": pred["se"]}
        if is_training_eta(eta, update):
            row["training"] = update["training_eta_label"]
        if jackknife is not None and jackknife["available"]:
            se_u = abs(eta) * jackknife["X_dot_v_se_u"]
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


def update_note(update: dict | None, comparison: dict | None = None) -> str:
    """Lines on the trainer checkpoint behind v: its step, the learning rate of the next step, the
    η marked * in the table; for a checkpoint difference, the probe's own AdamW step against it."""
    checkpoint = (update or {}).get("checkpoint")
    if not checkpoint:
        return ""
    lr = checkpoint["learning_rate"]
    lr_text = f"{lr:.4g} ({checkpoint['learning_rate_source']})" if lr is not None else "unknown (no scheduler.pt, " \
        "no learning_rate logged at this step)"
    lines = [f"Trainer checkpoint {checkpoint['path']} (global step {checkpoint['global_step']}, "
             f"{checkpoint['kind']}); learning rate: {lr_text}"]
    if update.get("optimizer") == "checkpoint_diff":
        lines.append(f"v = θ({update['next_checkpoint']}) − θ(checkpoint): the trainer's step"
                     f"{'' if update.get('steps_between') == 1 else 's'} {checkpoint['global_step']} -> "
                     f"{update['next_global_step']}; * η = 1 is that step (δH₁: its first-order prediction, ΔH "
                     "(SNIS): what it did with θ's nucleus held fixed)")
    elif update.get("training_eta") is not None:
        lines.append(f"* η = {update['training_eta']:.4g}: the training lr, the learning rate of the trainer's next "
                     f"step (here with the {update['optimizer']} direction from this U batch)")
    if comparison:
        cosine, ratio = comparison["cosine"], comparison["norm_ratio"]
        lines.append(
            f"The probe's own AdamW step (this checkpoint's optimizer state, this U batch's Y, lr {lr:.4g}) against "
            f"the trainer's: cosine {cosine:.3f}, norm ratio {ratio:.3f}, sign agreement "
            f"{comparison['sign_agreement']:.3f}; its δH₁ = lr·X·v = {comparison['probe_delta_h1']:.4g}"
            if cosine is not None and ratio is not None else "The probe's own AdamW step: the trainer's step is 0")
    return "\n".join(lines)


def format_table(rows: list[dict], unit: str, u_batch: dict | None = None, update: dict | None = None,
                 comparison: dict | None = None) -> str:
    def f(x, spec=".4g"):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    header = (f"{'eta':>9} {'δH₁':>11} {'±E':>8} {'±E+U':>8} {'ΔH (SNIS)':>11} {'±':>8} {'δH₁/ΔH':>8} "
              f"{'central':>11} {'ESS':>7} {'exact ΔH':>11}")
    lines = [f"Entropy change of one update step ({unit}). ±E: E-batch noise with v fixed; "
             "±E+U: also the U-batch noise in v (jackknife over U shards); exact: by enumeration", header]
    for r in rows:
        lines.append(
            f"{f(r['eta']) + ('*' if r.get('training') else ''):>9} {f(r['delta_h1']):>11} "
            f"{f(r['delta_h1_se'], '.2g'):>8} "
            f"{f(r.get('delta_h1_se_total'), '.2g'):>8} {f(r.get('delta_h')):>11} "
            f"{f(r.get('delta_h_se'), '.2g'):>8} {f(r.get('ratio_delta_h1_over_delta_h'), '.3f'):>8} "
            f"{f(r.get('central_difference')):>11} {f(r.get('ess'), '.1f'):>7} {f(r.get('exact_delta_h')):>11}"
        )
    if u_batch is not None:
        lines.append(u_batch_note(u_batch))
    note = update_note(update, comparison)
    if note:
        lines.append(note)
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
    for r in rows:
        if r.get("training"):
            for axis in (ax, ax_ratio):
                axis.axvline(r["eta"], color="tab:red", ls=":", lw=1.2, label=r["training"] if axis is ax else None)
    ax.legend()
    ratios = [r for r in measured if r.get("ratio_delta_h1_over_delta_h") is not None]
    ax_ratio.plot([r["eta"] for r in ratios], [r["ratio_delta_h1_over_delta_h"] for r in ratios], "o-")
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    ax_ratio.set(xscale="log", xlabel="learning rate η", ylabel="δH₁ / ΔH", title="linearity (→ 1 as η → 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
