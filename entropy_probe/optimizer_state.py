"""A saved ``torch.optim.AdamW`` state, mapped to parameter names (DESIGN §2 "Y and v").

A torch optimizer's ``state_dict()`` knows parameters only by their integer position in the
optimizer (the concatenation of its param groups, in order); its ``param_groups`` carry the
hyperparameters (betas, eps, weight_decay — trainers put biases and norms in a wd = 0 group).
The names come from a JSON file written next to it: a list with one list of parameter names per
param group, in the group's order (a flat list of all names, groups concatenated, is accepted
too). The embedded policy saves both (``optimizer.pt``, ``optimizer_param_names.json``). For an
HF Trainer / TRL checkpoint the name lists are rebuilt by the Trainer's own grouping rule and
passed directly (:mod:`entropy_probe.trainer_checkpoint`).

Every problem is an :class:`OptimizerStateError` naming the file and, where it applies, the
parameter: a configured state is never replaced by a fresh optimizer.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import ProbeError
from .update import AdamWHyper, AdamWParamState

log = logging.getLogger(__name__)



class OptimizerStateError(ValueError, ProbeError):
    """An optimizer state (or its names file) that cannot be loaded or does not fit the policy."""


@dataclass
class LoadedState:
    """The per-name AdamW state and a summary of it (recorded in v's metadata)."""

    path: str
    names_path: str
    per_param: dict[str, AdamWParamState]
    groups: list[dict]  # per param group: betas, eps, weight_decay, lr, num_params
    steps: list[float]  # distinct step counts over the stepped parameters (sorted)
    num_unstepped: int  # parameters of the groups with no saved state (never stepped: zeros)

    def summary(self) -> dict:
        return {"optimizer_state": self.path, "optimizer_param_names": self.names_path,
                "optimizer_step": int(max(self.steps)) if self.steps else 0,
                "optimizer_step_min": int(min(self.steps)) if self.steps else 0,
                "optimizer_param_groups": self.groups, "optimizer_unstepped_params": self.num_unstepped}


def _read_names(names_path: str, param_groups: list[dict], names=None) -> list[list[str]]:
    """The names file (or ``names`` given directly) as one list per param group, checked against
    the groups' sizes."""
    if names is None:
        try:
            names = json.loads(Path(names_path).read_text())
        except (OSError, ValueError) as err:
            raise OptimizerStateError(f"{names_path}: cannot read the optimizer parameter names ({err})") from err
    sizes = [len(g["params"]) for g in param_groups]
    if isinstance(names, list) and all(isinstance(n, str) for n in names):  # flat: groups concatenated
        if len(names) != sum(sizes):
            raise OptimizerStateError(
                f"{names_path}: {len(names)} parameter names, but the optimizer state has {sum(sizes)} parameters")
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        names = [names[a:b] for a, b in zip(bounds, bounds[1:])]
    elif not (isinstance(names, list) and all(isinstance(g, list) and all(isinstance(n, str) for n in g)
                                              for g in names)):
        raise OptimizerStateError(
            f"{names_path}: expected a JSON list of parameter-name lists (one per param group) or a list of names")
    if len(names) != len(sizes):
        raise OptimizerStateError(
            f"{names_path}: {len(names)} name groups, but the optimizer state has {len(sizes)} param groups")
    for i, (group_names, size) in enumerate(zip(names, sizes)):
        if len(group_names) != size:
            raise OptimizerStateError(
                f"{names_path}: param group {i} lists {len(group_names)} names, but the optimizer state's group "
                f"{i} has {size} parameters")
    counts = Counter(n for g in names for n in g)
    duplicates = sorted(n for n, c in counts.items() if c > 1)
    if duplicates:
        raise OptimizerStateError(f"{names_path}: parameter names listed more than once: {duplicates[:3]}")
    return names


def _name_hint(name: str, params: dict) -> str:
    """Why a name may be missing: PEFT naming (``base_model.model.`` prefix, ``.default.`` adapter
    segment) or an adapter that is not loaded."""
    peft = [n for n in params if n.startswith("base_model.model.")]
    if ".lora_" in name and not peft:
        return " (it names a LoRA parameter but the policy has no adapter: set model.adapter_path)"
    if not peft:
        return ""
    stripped = {n.replace("base_model.model.", "", 1).replace(".default.", "."): n for n in peft}
    guess = stripped.get(name.replace("base_model.model.", "", 1).replace(".default.", "."))
    if guess:
        return (f" (the policy's PEFT name is {guess!r}: name parameters as the PeftModel's named_parameters(), "
                "e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight)")
    return (" (with an adapter, names are the PeftModel's named_parameters(), e.g. "
            f"{next(n for n in peft if '.lora_' in n) if any('.lora_' in n for n in peft) else peft[0]!r})")


def _group_hyper(path: str, i: int, group: dict) -> AdamWHyper:
    for key in ("betas", "eps", "weight_decay", "params"):
        if key not in group:
            raise OptimizerStateError(f"{path}: param group {i} has no {key!r}; not an Adam/AdamW state")
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise OptimizerStateError(
                f"{path}: param group {i} has {flag}=True; the AdamW update vector does not cover it")
    if group.get("decoupled_weight_decay") is False and float(group["weight_decay"]) != 0:
        raise OptimizerStateError(
            f"{path}: param group {i} is torch.optim.Adam with L2 weight decay (decoupled_weight_decay=False, "
            f"weight_decay={float(group['weight_decay'])}), not AdamW")
    betas = tuple(float(b) for b in group["betas"])
    if len(betas) != 2:
        raise OptimizerStateError(f"{path}: param group {i} has betas {group['betas']!r}, expected two")
    return AdamWHyper(betas=betas, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]))


def read_state_dict(path: str | Path, mmap: bool = False) -> dict:
    """A torch optimizer ``state_dict`` (``torch.load(weights_only=True)``: no pickled code runs);
    ``mmap``: the tensors memory-mapped, read only when used (zip-format files; shapes are free)."""
    import zipfile

    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=True,
                           mmap=mmap and zipfile.is_zipfile(str(path)))
    except Exception as err:  # unpickling errors come in many types; all mean "not loadable"
        raise OptimizerStateError(f"{path}: cannot load the optimizer state ({type(err).__name__}: {err})") from err
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise OptimizerStateError(f"{path}: not a torch optimizer state_dict (no 'state' and 'param_groups')")
    return saved


def load_adamw_state(path: str, names: str | list[list[str]], params: dict[str, Tensor], *,
                     state_dict: dict | None = None) -> LoadedState:
    """Load an AdamW ``state_dict`` (:func:`read_state_dict`, or ``state_dict`` already read from
    ``path``) and map it to the policy's parameters by name. ``names``: the names file, or the
    name lists themselves (one per param group, e.g. :mod:`entropy_probe.trainer_checkpoint`'s).
    ``params``: every named parameter of the policy (for the name and shape checks)."""
    given = None if isinstance(names, (str, Path)) else [list(g) for g in names]
    path, names_path = str(path), (f"{path} (parameter order)" if given is not None else str(names))
    saved = read_state_dict(path) if state_dict is None else state_dict
    groups = saved["param_groups"]
    hypers = [_group_hyper(path, i, g) for i, g in enumerate(groups)]
    lrs = {float(g["lr"]) for g in groups if "lr" in g}
    if len(lrs) > 1:
        raise OptimizerStateError(
            f"{path}: the param groups have different learning rates {sorted(lrs)}; v is per unit of one learning "
            "rate, so per-group learning rates are not supported")
    names = _read_names(names_path, groups, given)

    per_param: dict[str, AdamWParamState] = {}
    steps: set[float] = set()
    covered_ids = set()
    unstepped = 0
    for i, (group, group_names, hyper) in enumerate(zip(groups, names, hypers)):
        for pid, name in zip(group["params"], group_names):
            covered_ids.add(pid)
            if name not in params:
                raise OptimizerStateError(
                    f"{names_path}: parameter {name!r} (param group {i}) is not a parameter of the policy"
                    f"{_name_hint(name, params)}")
            entry = saved["state"].get(pid)
            if entry is None:  # never stepped: torch initializes it lazily, as zeros at step 0
                per_param[name] = AdamWParamState(hyper=hyper)
                unstepped += 1
                continue
            missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in entry]
            if missing:
                raise OptimizerStateError(f"{path}: state of parameter {name!r} lacks {missing}")
            shape = tuple(params[name].shape)
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(entry[key].shape) != shape:
                    raise OptimizerStateError(
                        f"{path}: parameter {name!r}: {key} has shape {tuple(entry[key].shape)}, the policy's "
                        f"parameter has shape {shape} (another model, or a names file in another order?)")
            step = float(entry["step"])
            steps.add(step)
            per_param[name] = AdamWParamState(step=step, exp_avg=entry["exp_avg"], exp_avg_sq=entry["exp_avg_sq"],
                                              hyper=hyper)
    stray = sorted(set(saved["state"]) - covered_ids, key=str)
    if stray:
        raise OptimizerStateError(f"{path}: state entries {stray[:3]} belong to no param group")
    if unstepped:
        log.warning("%s: %d of %d parameters have no saved state (never stepped); they start from zeros, as in torch",
                    path, unstepped, len(per_param))
    summary = [{"betas": list(h.betas), "eps": h.eps, "weight_decay": h.weight_decay,
                "lr": float(g["lr"]) if "lr" in g else None, "num_params": len(g["params"])}
               for h, g in zip(hypers, groups)]
    return LoadedState(path=path, names_path=names_path, per_param=per_param, groups=summary,
                       steps=sorted(steps), num_unstepped=unstepped)
