"""What a model job cost, measured as it ran: the tokens it generated one by one, the tokens its
forward passes ran over, the tokens its backward passes ran over, and its wall seconds.

A token is one real token of a sequence (prompt or response, never padding), counted once per pass
over it: a teacher-forced forward and backward over N sequence tokens count N forward and N
backward tokens; a pass recomputed for gradient checkpointing counts its forward twice; a forward
with a tangent (forward-mode AD) counts as a forward; a generation counts each sequence it produced
once as forward tokens (prefill and decoding steps together) and its response tokens as generated.
Seconds run from the start of the job's stage (model loading included) to the write of its output.

Each model stage records its cost in the header of the file it writes (``cost``) and says it in its
log; the report sums them per stage (summary.json ``cost``) and ``benchmarks/run.py --e2e`` prints
each stage's share. What a run will cost, counted from its config before it runs:
:mod:`entropy_probe.cost`. The exact reference (an enumeration on the embedded policy, a check
rather than a stage of a probe) and the embedded policy's training report their wall time in their
benchmark files only.
"""
from __future__ import annotations

import time

COUNTS = ("generated_tokens", "forward_tokens", "backward_tokens")

_job = {"label": "", "started": time.perf_counter()}


def label(rule: str, values: dict) -> str:
    """A job's stage in the account: its rule, and the batch, update variant or objective it runs
    for where the rule's name does not say it (``rollout E``, ``variant_directional dapo``)."""
    named = rule.lower().split("_")
    extra = [str(values[k]) for k in ("kind", "variant", "objective")
             if values.get(k) and str(values[k]).lower() not in named]
    return " ".join([rule, *extra])


def start(label: str) -> None:
    """The job's clock starts now; ``label`` names its stage in the account (the rule, and the
    batch or the update variant it runs for: ``rollout E``, ``variant_directional dapo``)."""
    _job.update(label=label, started=time.perf_counter())


def record(*, generated: int = 0, forward: int = 0, backward: int = 0, **details) -> dict:
    """The job's cost so far: its label, the three token counts, its seconds since :func:`start`,
    and ``details`` (stage-specific counts, e.g. what regeneration would have generated)."""
    counts = {"generated_tokens": int(generated), "forward_tokens": int(forward), "backward_tokens": int(backward)}
    return {"stage": _job["label"], **counts, **details, "seconds": round(time.perf_counter() - _job["started"], 3)}


def sequence_tokens(rollout: dict) -> int:
    """The real tokens (prompt and response) of a rollout shard's sequences: the sum of its
    ``attention_masks``."""
    return int(rollout["attention_masks"].sum())


def describe(cost: dict) -> str:
    """One log line: ``cost of <stage>: G generated, F forward, B backward tokens, S s``."""
    return (f"cost of {cost['stage'] or 'this job'}: {cost['generated_tokens']:,} tokens generated, "
            f"{cost['forward_tokens']:,} forward, {cost['backward_tokens']:,} backward; {cost['seconds']:.1f} s")


def recorded(meta: dict) -> list[dict | None]:
    """The job costs a file's header (or JSON) holds: its own job's (``cost``), or those of the
    temporary shards it reduced (``job_costs``); [None] when it holds none (written by a version
    that did not record costs)."""
    if "job_costs" in meta:
        return list(meta["job_costs"])
    return [meta.get("cost")]


def by_stage(costs: list[dict]) -> dict:
    """The account of a run from its jobs' costs (in the order first seen): per stage its jobs, the
    three token counts and seconds summed and its share of the summed seconds, and the total."""
    rows: dict[str, dict] = {}
    for cost in costs:
        row = rows.setdefault(cost["stage"], {"stage": cost["stage"], "jobs": 0, **dict.fromkeys(COUNTS, 0),
                                              "seconds": 0.0})
        row["jobs"] += 1
        for name in (*COUNTS, "seconds"):
            row[name] += cost[name]
    total = {"jobs": sum(r["jobs"] for r in rows.values()),
             **{name: sum(r[name] for r in rows.values()) for name in (*COUNTS, "seconds")}}
    for row in (*rows.values(), total):
        row["seconds"] = round(row["seconds"], 3)
        row["share_of_seconds"] = row["seconds"] / total["seconds"] if total["seconds"] > 0 else None
    return {"stages": list(rows.values()), "total": total}


def format_account(account: dict) -> str:
    """The account as a text table, one row per stage and the total."""
    lines = [f"{'stage':<32} {'jobs':>4} {'generated':>11} {'forward':>12} {'backward':>12} {'seconds':>9} {'share':>6}"]
    for row in (*account["stages"], {"stage": "total", **account["total"]}):
        share = "" if row["share_of_seconds"] is None else f"{row['share_of_seconds']:.0%}"
        lines.append(f"{row['stage']:<32} {row['jobs']:>4} {row['generated_tokens']:>11,} {row['forward_tokens']:>12,} "
                     f"{row['backward_tokens']:>12,} {row['seconds']:>9.1f} {share:>6}")
    return "\n".join(lines) + "\n"
