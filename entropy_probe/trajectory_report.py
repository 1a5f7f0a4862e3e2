"""The report over a training run (``model.checkpoints``): one row per step t -> t+1 from that
pair's summary.json — H at checkpoint t (the E batch's H̄ ± SE), δH₁(1) = X·(θ_{t+1} − θ_t) ± SE
(the first-order prediction of the step), ΔH(1) by SNIS ± SE (what the step did, θ_t's nucleus
held fixed), their ratio and ESS, and, where checkpoint t has its AdamW state, the probe's own
step lr_t·v_probe (U batch) against the real one: cosine, norm ratio, and the δH₁ it predicts.

The sampler's own ΔH (coupled fresh rollouts, DESIGN §2b) is read from a summary row's
``delta_h_sampler`` / ``delta_h_sampler_se`` when the summary has them (:data:`SAMPLER_KEYS`);
until then its column shows "-".
"""
from __future__ import annotations

from pathlib import Path

SAMPLER_KEYS = ("delta_h_sampler", "delta_h_sampler_se")


def _step_row(summary: dict, where: str) -> dict:
    rows = [r for r in summary["rows"] if r.get("training")]
    if len(rows) != 1:
        raise ValueError(f"{where}: no row of the trainer's step (η = 1) in the summary: not a checkpoint_diff probe")
    return rows[0]


def trajectory_rows(summaries: list[tuple[str, dict]]) -> list[dict]:
    """One row per (pair id, summary.json contents), in training order."""
    rows = []
    for pair, summary in summaries:
        update = summary["update"]
        checkpoint = update["checkpoint"]
        step = _step_row(summary, pair)
        base = summary["delta_h_snis"]["rows"][0]
        comparison = summary.get("step_comparison") or {}
        row = {"pair": pair, "global_step": checkpoint["global_step"], "next_global_step": update["next_global_step"],
               "learning_rate": checkpoint["learning_rate"], "H": base["H_base"], "H_se": base.get("H_base_se"),
               "step_norm": update.get("step_norm"), "delta_h1": step["delta_h1"], "delta_h1_se": step["delta_h1_se"]}
        for key in ("delta_h", "delta_h_se", "ess", "ratio_delta_h1_over_delta_h", "central_difference", *SAMPLER_KEYS):
            row[key] = step.get(key)
        for key in ("cosine", "norm_ratio", "sign_agreement", "probe_delta_h1"):
            row[key] = comparison.get(key)
        rows.append(row)
    return rows


def format_table(rows: list[dict], unit: str) -> str:
    def f(x, spec=".4g"):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    header = (f"{'step':>11} {'lr':>9} {'H_t':>9} {'±':>7} {'δH₁':>10} {'±':>7} {'ΔH SNIS':>10} {'±':>7} "
              f"{'δH₁/ΔH':>7} {'ESS':>6} {'ΔH sampler':>10} {'cos':>6} {'|lr·v|/|Δθ|':>11} {'probe δH₁':>10}")
    lines = [f"Entropy over training ({unit}), one row per step t -> t+1 of the trainer. H_t: the E batch's H at "
             "checkpoint t; δH₁ = X·(θ_{t+1} − θ_t), the first-order prediction of the step; ΔH SNIS: what the step "
             "did (θ_t's nucleus held fixed); ΔH sampler: the sampler's own change (fresh rollouts, when available); "
             "cos, |lr·v|/|Δθ|, probe δH₁: the probe's own AdamW step from checkpoint t's optimizer state and its U "
             "batch, at the training lr, against the trainer's step", header]
    for r in rows:
        lines.append(
            f"{str(r['global_step']) + '->' + str(r['next_global_step']):>11} {f(r['learning_rate'], '.3g'):>9} "
            f"{f(r['H']):>9} {f(r['H_se'], '.2g'):>7} {f(r['delta_h1']):>10} {f(r['delta_h1_se'], '.2g'):>7} "
            f"{f(r['delta_h']):>10} {f(r['delta_h_se'], '.2g'):>7} {f(r['ratio_delta_h1_over_delta_h'], '.3f'):>7} "
            f"{f(r['ess'], '.1f'):>6} {f(r['delta_h_sampler']):>10} {f(r['cosine'], '.3f'):>6} "
            f"{f(r['norm_ratio'], '.3f'):>11} {f(r['probe_delta_h1']):>10}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path, unit: str) -> None:
    """H_t over training; δH₁, ΔH (and the probe's δH₁) per step; cosine and norm ratio of the
    probe's step against the trainer's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["global_step"] for r in rows]
    fig, (ax_h, ax_d, ax_c) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_h.errorbar(steps, [r["H"] for r in rows], yerr=[r["H_se"] or 0 for r in rows], marker="o", capsize=3)
    ax_h.set(xlabel="global step t", ylabel=f"H ({unit})", title="entropy at checkpoint t (E batch)")
    ax_d.errorbar(steps, [r["delta_h1"] for r in rows], yerr=[r["delta_h1_se"] for r in rows], marker="o", capsize=3,
                  label="δH₁ = X·Δθ (first order)")
    measured = [r for r in rows if r["delta_h"] is not None]
    ax_d.errorbar([r["global_step"] for r in measured], [r["delta_h"] for r in measured],
                  yerr=[r["delta_h_se"] for r in measured], marker="s", capsize=3, label="ΔH (SNIS)")
    sampler = [r for r in rows if r["delta_h_sampler"] is not None]
    if sampler:
        ax_d.errorbar([r["global_step"] for r in sampler], [r["delta_h_sampler"] for r in sampler],
                      yerr=[r["delta_h_sampler_se"] or 0 for r in sampler], marker="^", capsize=3,
                      label="ΔH (sampler)")
    probe = [r for r in rows if r["probe_delta_h1"] is not None]
    if probe:
        ax_d.plot([r["global_step"] for r in probe], [r["probe_delta_h1"] for r in probe], "x--",
                  label="δH₁ of the probe's AdamW step")
    ax_d.axhline(0.0, color="gray", lw=0.8)
    ax_d.set(xlabel="global step t (step t -> t+1)", ylabel=f"entropy change ({unit})", title="one step of training")
    ax_d.legend(fontsize=8)
    compared = [r for r in rows if r["cosine"] is not None]
    ax_c.plot([r["global_step"] for r in compared], [r["cosine"] for r in compared], "o-", label="cosine")
    ax_c.plot([r["global_step"] for r in compared], [r["norm_ratio"] for r in compared], "s-",
              label="‖lr·v_probe‖ / ‖Δθ‖")
    ax_c.axhline(1.0, color="gray", lw=0.8)
    ax_c.set(xlabel="global step t", title="the probe's AdamW step vs the trainer's")
    if compared:
        ax_c.legend(fontsize=8)
    else:
        ax_c.text(0.5, 0.5, "no optimizer state in the checkpoints", ha="center", transform=ax_c.transAxes)
    for axis in (ax_h, ax_d, ax_c):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
