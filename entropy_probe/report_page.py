"""The landing page of ``snakemake --report`` (``workflow/report/workflow.rst`` includes it): the
summary table as a compact reStructuredText table, narrow enough for the report's text column,
and the plot embedded as a data URI, so that the page shows it wherever the HTML file is moved
(a relative ``<img>`` link breaks as soon as the file leaves the project directory).
"""
from __future__ import annotations

import base64

from . import entropies

COLUMNS = ("η", "δH₁ ± SE", "ΔH θ-nucleus ± SE", "δH₁/ΔH", "ΔH sampler ± SE", "exact ΔH θ-nucleus / sampler")


MISSING = "–"  # not "-": a lone "-" in a table cell would start a bullet list


def _num(x, spec: str = ".3g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else MISSING


def _pm(value, se) -> str:
    return MISSING if value is None else f"{_num(value)} ± {_num(se, '.2g')}"


URI_LINE = 76  # docutils drops a whole included file with a line over 10,000 characters


def image(png: bytes, alt: str) -> str:
    """An rst image directive holding ``png`` as a data URI, wrapped over short lines (docutils
    joins a URI argument's lines and removes the whitespace)."""
    data = base64.b64encode(png).decode()
    lines = [f"   {data[i:i + URI_LINE]}" for i in range(0, len(data), URI_LINE)]
    return "\n".join([".. image:: data:image/png;base64,", *lines, f"   :alt: {alt}", "   :width: 100%"]) + "\n"


def list_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """An rst list-table (cells wrap in a narrow column, unlike a literal block)."""
    lines = [f".. list-table:: {title}", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines += [f"   * - {row[0]}"] + [f"     - {cell}" for cell in row[1:]]
    return "\n".join(lines) + "\n"


def summary_cells(row: dict) -> list[str]:
    """One η's cells: δH₁ with its total SE (E and U batch) where known, the SNIS ΔH with θ's
    nucleus (``!`` where its ESS is too low to trust its SE), the ratio, the sampler's ΔH and the
    exact values."""
    eta = _num(row["eta"]) + ("*" if row.get("training") else "")
    delta_h = _pm(row.get("delta_h"), row.get("delta_h_se")) + (" !" if row.get("ess_low") else "")
    ratio = MISSING if row.get("ratio_delta_h1_over_delta_h") is None else (
        f"{_num(row['ratio_delta_h1_over_delta_h'], '.3f')} ± {_num(row.get('ratio_se'), '.2g')}")
    exact = (MISSING if row.get("exact_delta_h") is None else
             f"{_num(row['exact_delta_h'])} / {_num(row.get('exact_delta_h_sampler'))}")
    return [eta, _pm(row["delta_h1"], row.get("delta_h1_se_total", row["delta_h1_se"])), delta_h, ratio,
            _pm(row.get("delta_h_sampler"), row.get("delta_h_sampler_se")), exact]


def summary_page(rows: list[dict], unit: str, entropy: str, plot_png: bytes, notes: list[str]) -> str:
    """The landing fragment of one probe: the table (columns without any value left out), the
    notes (flags, the U batch, the trainer's step, the precision) and the plot."""
    cells = [summary_cells(r) for r in rows]
    keep = [j for j in range(len(COLUMNS)) if j == 0 or any(c[j] != MISSING for c in cells)]
    table = list_table(f"Entropy change of one step ({unit}; {entropies.get(entropy).description})",
                       [COLUMNS[j] for j in keep], [[c[j] for j in keep] for c in cells])
    parts = [table, *[f"{note}\n" for note in notes if note],
             image(plot_png, "δH₁ and ΔH against η, and δH₁/ΔH")]
    return "\n".join(parts)


def trajectory_page(rows: list[dict], unit: str, plot_png: bytes) -> str:
    """The landing fragment of a trajectory: one row per step t -> t+1 and the plot."""
    header = ["step", "H_t ± SE", "δH₁ ± SE", "ΔH SNIS ± SE", "ΔH sampler ± SE", "cos"]
    body = [[f"{r['global_step']}->{r['next_global_step']}", _pm(r["H"], r["H_se"]),
             _pm(r["delta_h1"], r["delta_h1_se"]), _pm(r["delta_h"], r["delta_h_se"]),
             _pm(r["delta_h_sampler"], r.get("delta_h_sampler_se")), _num(r["cosine"], ".3f")] for r in rows]
    return "\n".join([list_table(f"Entropy over training ({unit})", header, body),
                      image(plot_png, "H over training and the change of each step")])
