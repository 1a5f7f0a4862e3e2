"""The final report: summary.json (every number plus provenance), a text table and the plot of
ΔH(η) and δH₁(η) against η."""
from __future__ import annotations

import math
import subprocess
from importlib import metadata
from pathlib import Path

from . import entropies, first_order, fresh


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


# What each column is (the table's legend, the plot's labels, summary.json's "columns").
COLUMNS = {
    "delta_h1": "δH₁: first order, η·X·v",
    "delta_h": "ΔH with the nucleus of θ held fixed (SNIS): the smooth target δH₁ is checked against",
    "delta_h_sampler": "ΔH of the sampler (fresh rollouts, own nucleus): what training will see",
    "delta_h_boundary": "ΔH sampler minus ΔH θ-nucleus on the same E slots (paired SE): what the own nucleus of "
                        "θ + ηv adds, tokens crossing the top_p boundary",
    "exact_delta_h": "exact ΔH with the nucleus of θ (enumeration of the embedded policy)",
    "exact_delta_h_sampler": "exact ΔH of the sampler (enumeration, θ + ηv's own nucleus)",
}


U_SE_SOURCE = "influence over the U batch's prompt groups (B_U − 1 degrees of freedom; entropy_probe/attribution.py)"


def combine(first_report: dict, snis: dict | None, x_dot_v_se_u: float | None = None, exact: dict | None = None,
            sampler: dict | None = None, linearity: dict | None = None) -> list[dict]:
    """One row per η of the sweep (and per fresh-rollout η outside it): δH₁ with its E-side SE
    and, when the U-batch SE of X·v is given (the attribution stage's influence SE), its U-side
    and total SE (E and U batches are independent, so variances add); the SNIS ΔH (θ's nucleus) ± SE with its ESS and the low-ESS
    flag, the ratio δH₁/ΔH (± its delta-method SE when ``linearity`` gives it), the central
    difference (ΔH(η) − ΔH(−η))/2 when −η was measured; the sampler's own ΔH (fresh rollouts)
    ± SE, the responses that changed and the coupling's SE factor; and the exact values of both
    ΔH (and η·∇H·v) when known (``exact``: {η: {"exact_delta_h", "exact_delta_h_sampler",
    "exact_delta_h1"}}). The row of the trainer's step (v's training η) says so (``training``).
    Without ``snis`` (an update variant that does not measure ΔH) the rows hold δH₁ only."""
    measured = {row["eta"]: row for row in (snis or {}).get("rows", [])}
    update = first_report.get("update")
    fresh = {row["eta"]: row for row in (sampler or {}).get("rows", [])}
    predicted = {pred["eta"]: pred for pred in first_report["delta_h1"]}
    for eta in fresh:  # a fresh-rollout η outside eta_list: δH₁ = η·X·v all the same
        predicted.setdefault(eta, first_order.delta_h1(eta, first_report["X_dot_v"], first_report["X_dot_v_se"]))
    swept = [p["eta"] for p in first_report["delta_h1"]]
    rows = []
    for eta in swept + sorted(set(predicted) - set(swept)):
        pred = predicted[eta]
        row = {"eta": eta, "delta_h1": pred["delta_h1"], "delta_h1_se": pred["se"]}
        if is_training_eta(eta, update):
            row["training"] = update["training_eta_label"]
        if x_dot_v_se_u is not None:
            se_u = abs(eta) * x_dot_v_se_u
            row |= {"delta_h1_se_u": se_u, "delta_h1_se_total": (pred["se"] ** 2 + se_u**2) ** 0.5}
        if eta in measured:
            m = measured[eta]
            row |= {"delta_h": m["delta_h"], "delta_h_se": m["se"], "ess": m["ess"],
                    "ess_fraction": m.get("ess_fraction", m["ess"] / m["num_sequences"]),
                    "ess_low": m.get("ess_low", False),
                    "num_sequences": m["num_sequences"], "own_nucleus_differs_share": m["own_nucleus_differs_share"],
                    "log_weight_range": [m["log_weight_min"], m["log_weight_max"]],
                    "ratio_delta_h1_over_delta_h": pred["delta_h1"] / m["delta_h"] if m["delta_h"] != 0 else None}
            if linearity and eta in linearity:
                row["ratio_se"] = linearity[eta]["ratio_se"]
        if -eta in measured and eta in measured:
            row["central_difference"] = (measured[eta]["delta_h"] - measured[-eta]["delta_h"]) / 2
        if eta in fresh:
            f = fresh[eta]
            row |= {"delta_h_sampler": f["delta_h"], "delta_h_sampler_se": f["se"],
                    "changed_responses": f["changed_responses"], "changed_share": f["changed_share"],
                    "coupling_se_factor": f["coupling_se_factor"]}
            if f.get("decomposition"):  # ΔH_sampler = ΔH with θ's nucleus (same slots) + the boundary part
                row |= {"delta_h_boundary": f["decomposition"]["boundary"],
                        "delta_h_boundary_se": f["decomposition"]["boundary_se"],
                        "nucleus_events": f["nucleus_events"], "events_low": f["events_low"]}
        if exact is not None and eta in exact:
            row |= {k: v for k, v in exact[eta].items()
                    if k in ("exact_delta_h", "exact_delta_h_sampler", "exact_delta_h1")}
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


def flag_note(rows: list[dict], min_ess_fraction: float) -> str:
    """The meaning of the flags, for those a row has: ``!`` (SNIS with too low an ESS) and ``?``
    (the sampler's change resting on too few nucleus events)."""
    lines = []
    if any(r.get("ess_low") for r in rows):
        lines.append(f"! ESS/N below {min_ess_fraction:g}: the SNIS SE is not to be trusted there (docs/science.md, "
                     "SNIS where it fails); read the ΔH sampler column (fresh rollouts), which has no weights")
    if any(r.get("events_low") for r in rows):
        lines.append(f"? ΔH sampler rests on fewer than {fresh.MIN_NUCLEUS_EVENTS} E sequences whose visited nucleus "
                     "moves (events): its SE is not to be trusted there (docs/science.md); more E sequences "
                     "(batch_config.E_total_sequences) or a larger η measure it")
    return "\n".join(lines)


def format_table(rows: list[dict], unit: str, entropy: str = "sampler", min_ess_fraction: float = 0.1,
                 notes: list[str] = ()) -> str:
    """The summary table: a legend naming every column, one line per η, the flags' meaning and
    ``notes`` (the U batch's signal, the trainer's step, the precision). No '<', '>', '&' or
    apostrophe (the report's HTML shows it verbatim and would escape them)."""
    def f(x, spec=".4g"):
        return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"

    lines = [
        f"Entropy change of one update step ({unit}; entropy: {entropies.get(entropy).description}). Columns:",
        f"  δH₁           {COLUMNS['delta_h1']}; ±E: E-batch noise with v fixed, "
        "±E+U: also the U-batch noise in v (influence over U prompt groups)",
        f"  ΔH θ-nucleus  {COLUMNS['delta_h']}; ESS/N of its weights; δH₁/ΔH ± delta-method SE",
        "  central       (ΔH(η) − ΔH(−η))/2 with the nucleus of θ, the cleanest check of δH₁",
        f"  ΔH sampler    {COLUMNS['delta_h_sampler']}; changed: responses redrawn differently; "
        "coupling: SE with independent noise / SE",
        f"  boundary      {COLUMNS['delta_h_boundary']}",
        "  exact ...     both ΔH by enumeration (embedded policy only)",
    ]
    header = (f"{'eta':>8} {'δH₁':>10} {'±E':>7} {'±E+U':>7} | {'ΔH θ-nucleus':>12} {'±':>7} {'ESS/N':>6} "
              f"{'δH₁/ΔH':>7} {'±':>6} {'central':>10} | {'ΔH sampler':>10} {'±':>7} {'changed':>7} "
              f"{'coupling':>8} {'boundary':>10} {'±':>7} | {'exact θ-nuc':>11} {'exact sampler':>13}")
    lines.append(header)
    for r in rows:
        ess = f(r.get("ess_fraction"), ".3f") + ("!" if r.get("ess_low") else "")
        coupling = f"{r['coupling_se_factor']:.3g}x" if r.get("coupling_se_factor") else "-"
        sampler = f(r.get("delta_h_sampler")) + ("?" if r.get("events_low") else "")
        lines.append(
            f"{f(r['eta']) + ('*' if r.get('training') else ''):>8} {f(r['delta_h1']):>10} {f(r['delta_h1_se'], '.2g'):>7} "
            f"{f(r.get('delta_h1_se_total'), '.2g'):>7} | {f(r.get('delta_h')):>12} {f(r.get('delta_h_se'), '.2g'):>7} "
            f"{ess:>6} {f(r.get('ratio_delta_h1_over_delta_h'), '.3f'):>7} {f(r.get('ratio_se'), '.2g'):>6} "
            f"{f(r.get('central_difference')):>10} | {sampler:>10} "
            f"{f(r.get('delta_h_sampler_se'), '.2g'):>7} {f(r.get('changed_responses'), 'd'):>7} {coupling:>8} "
            f"{f(r.get('delta_h_boundary')):>10} {f(r.get('delta_h_boundary_se'), '.2g'):>7} | "
            f"{f(r.get('exact_delta_h')):>11} {f(r.get('exact_delta_h_sampler')):>13}"
        )
    lines += [note for note in (flag_note(rows, min_ess_fraction), *notes) if note]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path, unit: str) -> list[str]:
    """Left: the entropy changes per unit learning rate, ΔH(η)/η, against η (log x, linear y; the
    first-order prediction is the flat line X·v): δH₁ (E+U bars), the SNIS ΔH with θ's nucleus
    (low-ESS points hollow), the sampler's ΔH (fresh rollouts; hollow on few nucleus events) and
    both exact curves. Right: δH₁/ΔH (SNIS) with delta-method bars, and the exact ratio. Returns
    the legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["eta"] > 0]
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(13, 4.8))

    def series(key, se_key=None, scale=True):
        chosen = [r for r in rows if r.get(key) is not None]
        per = [r["eta"] if scale else 1.0 for r in chosen]
        return ([r["eta"] for r in chosen], [r[key] / d for r, d in zip(chosen, per)],
                [(r.get(se_key) or 0.0) / d for r, d in zip(chosen, per)] if se_key else None, chosen)

    eta, y, _, _ = series("delta_h1")
    ax.errorbar(eta, y, yerr=[r.get("delta_h1_se_total", r["delta_h1_se"]) / r["eta"] for r in rows], marker="o",
                capsize=3, label=COLUMNS["delta_h1"])
    for key, flag, marker, label, low_label in (
            ("delta_h", "ess_low", "s", "ΔH with the nucleus of θ (SNIS)",
             "SNIS with low ESS: SE not to be trusted, see the sampler"),
            ("delta_h_sampler", "events_low", "^", "ΔH of the sampler (fresh rollouts)",
             "sampler on few nucleus events: SE not to be trusted")):
        eta, y, err, chosen = series(key, f"{key}_se")
        if not eta:
            continue
        ok = [i for i, r in enumerate(chosen) if not r.get(flag)]
        low = [i for i, r in enumerate(chosen) if r.get(flag)]  # flagged: hollow markers
        bars = ax.errorbar([eta[i] for i in ok], [y[i] for i in ok], yerr=[err[i] for i in ok], marker=marker,
                           capsize=3, label=label)
        if low:
            ax.errorbar([eta[i] for i in low], [y[i] for i in low], yerr=[err[i] for i in low], marker=marker,
                        mfc="none", capsize=3, ls="none", color=bars[0].get_color(), label=low_label)
    for key, style, label in (("exact_delta_h", "k--", "exact ΔH, nucleus of θ"),
                              ("exact_delta_h_sampler", "k:", "exact ΔH of the sampler (own nucleus)")):
        eta, y, _, _ = series(key)
        if eta:
            ax.plot(eta, y, style, label=label)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="learning rate η", ylabel=f"ΔH(η) / η  ({unit} per unit η)",
           title="Entropy change of one step, per unit η (first order: flat at X·v)")
    eta, y, err, chosen = series("ratio_delta_h1_over_delta_h", "ratio_se", scale=False)
    if eta:
        ax_ratio.errorbar(eta, y, yerr=err, marker="o", capsize=3, label="δH₁ / ΔH (SNIS), delta-method SE")
        low = [i for i, r in enumerate(chosen) if r.get("ess_low")]
        if low:
            ax_ratio.plot([eta[i] for i in low], [y[i] for i in low], "o", mfc="white", color="C3",
                          label="low ESS (SNIS SE not to be trusted)")
    exact = [r for r in rows if r.get("exact_delta_h") and r.get("exact_delta_h1") is not None]
    if exact:
        ax_ratio.plot([r["eta"] for r in exact], [r["exact_delta_h1"] / r["exact_delta_h"] for r in exact], "k--",
                      label="exact η·∇H·v / exact ΔH (nucleus of θ)")
    for r in rows:
        if r.get("training"):
            for axis in (ax, ax_ratio):
                axis.axvline(r["eta"], color="tab:red", ls=":", lw=1.2, label=r["training"] if axis is ax else None)
    ax.legend(fontsize=7)
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    ax_ratio.set(xscale="log", xlabel="learning rate η", ylabel="δH₁ / ΔH", title="linearity (→ 1 as η → 0)")
    ax_ratio.legend(fontsize=7)
    labels = [t.get_text() for a in (ax, ax_ratio) for t in a.get_legend().get_texts()]
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels
