"""Cross-field checks of a schema-validated config (the schema itself checks types and ranges).

Each failure raises :class:`ConfigError` naming the config key and what is wrong, so a mistake
costs seconds before any job runs.
"""
from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

from .data import DataError, kind_splits, local_file, raw_size, source_kind
from .errors import ProbeError
from .checkpoint_config import check_checkpoint_config, is_embedded
from .input_files import EMBEDDED, looks_like_hub_id


class ConfigError(ValueError, ProbeError):
    """A config value that is invalid in combination with others, or names a missing file."""


def num_e_prompts(batch: dict) -> int:
    """ceil(E_total_sequences / G): E prompts, each with G responses."""
    return math.ceil(batch["E_total_sequences"] / batch["G"])


def embedded_dataset_size(toy: dict) -> int:
    return (toy["max_operand"] + 1) ** 2


def dataset_size(config: dict, kind: str = "E") -> int | None:
    """Number of prompts of batch ``kind``'s split before filtering, where it is known before any
    job runs (the embedded set's size is a function of the config; local files are counted);
    None for hub datasets and sliced splits (the plan checks the sizes after preparation)."""
    try:
        return raw_size(config, kind_splits(config["data"])[kind])
    except DataError as err:
        raise ConfigError(str(err)) from err


def _check_checkpoint(value: str, key: str, adapter: bool) -> None:
    """A local directory (that looks like a checkpoint / an adapter), or a hub id (checked when
    it is loaded). A local-looking path that does not exist fails now."""
    from .input_files import adapter_files, checkpoint_files

    path = Path(value).expanduser()
    if path.is_dir():
        if adapter and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"{key}: {value!r} has no adapter_config.json (not a PEFT adapter directory)")
        if adapter and not any(p.name.startswith("adapter_model") for p in adapter_files(path)):
            raise ConfigError(f"{key}: {value!r} has no adapter_model.safetensors / adapter_model.bin")
        if not adapter and not checkpoint_files(path):
            raise ConfigError(f"{key}: {value!r} holds no weights, config or tokenizer files (not a checkpoint)")
        return
    if path.exists():
        raise ConfigError(f"{key}: {value!r} is a file; give a checkpoint directory or a hub id")
    if not looks_like_hub_id(value):
        raise ConfigError(f"{key}: {value!r} is not an existing directory (hub ids look like 'org/name')")


def _check_data(config: dict) -> None:
    data = config["data"]
    try:
        kind = source_kind(data["source"])
        if kind == "file":
            for split in set(kind_splits(data).values()):
                local_file(data["source"], split)
    except DataError as err:
        raise ConfigError(str(err)) from err
    if kind == "embedded" and not is_embedded(config["model"]):
        raise ConfigError("data.source: 'embedded' prompts only go with the embedded policy (model.name_or_path: "
                          "embedded, no model.checkpoint); give the prompt file")
    if data.get("config_name") and kind != "hub":
        raise ConfigError("data.config_name: only hub datasets have configurations")
    if data.get("system_prompt") and not data.get("use_chat_template"):
        raise ConfigError("data.system_prompt: only used with data.use_chat_template: true")
    if data.get("answer_pattern"):
        try:
            re.compile(data["answer_pattern"])
        except re.error as err:
            raise ConfigError(f"data.answer_pattern: {data['answer_pattern']!r} is not a regex ({err})") from err
    template = data.get("prompt_template") or ""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ConfigError(f"data.prompt_template: {err} (literal braces are written {{{{ and }}}})") from err
    if any(not f or f.isdigit() for f in fields):
        raise ConfigError("data.prompt_template: fields must be named ({prompt} or a field of the rows); "
                          "literal braces are written {{ and }}")


def _binds(tree, name: str) -> bool:
    """Whether a module's top-level code (not function or class bodies) binds ``name``: a def, a
    class, an assignment or an import. A star import or module-level dynamic code (globals(),
    exec, setattr, a module __getattr__) counts as binding it: only a run could tell."""
    import ast

    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name in (name, "__getattr__"):
                return True
            stack.extend(node.decorator_list)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" or (a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
        elif isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store):
            return True
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "globals", "exec", "setattr", "vars"):
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _check_reward_source(target: str, func: str) -> None:
    """The custom reward's file, or module (found with importlib's find_spec from the working
    directory, as the rollouts import it), exists, parses, and binds ``func`` at top level. The
    source is read, never run (the workflow checks the config every time it starts)."""
    import ast
    import importlib.util
    import sys

    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward.function: file {target!r} does not exist")
    else:
        cwd = str(Path.cwd())
        added = "" not in sys.path and cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            spec = importlib.util.find_spec(target)
        except (ImportError, ValueError) as err:  # a parent package that is missing or fails to import
            raise ConfigError(f"reward.function: cannot import {target!r} ({type(err).__name__}: {err})") from err
        finally:
            if added:
                sys.path.remove(cwd)
        if spec is None:
            raise ConfigError(f"reward.function: module {target!r} not found (neither installed nor a file "
                              f"{target.replace('.', '/')}.py under the working directory {cwd})")
        if not (spec.origin or "").endswith(".py"):
            return  # a compiled or namespace module: checked when the rollouts load it
        path = Path(spec.origin)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as err:
        raise ConfigError(f"reward.function: cannot read {str(path)!r} ({type(err).__name__}: {err})") from err
    if not _binds(tree, func):
        raise ConfigError(f"reward.function: {str(path)!r} defines no {func!r} (no top-level def, class, "
                          "assignment or import of that name)")


def _check_optimizer_state(config: dict) -> None:
    """update.optimizer_state / optimizer_param_names: a sensible combination, and a configured
    state file and its names file exist, and the state looks like a torch.save file (a zip archive,
    or a pickle in the legacy format), so that a typo or a truncated copy fails now rather than
    after the rollouts. Loading it (the update_vector job) checks the contents."""
    import zipfile

    from .input_files import EMBEDDED_STATE, resolve_state_paths

    update = config["update"]
    try:
        paths = resolve_state_paths(update, "", is_embedded(config["model"]))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if paths is None or update["optimizer_state"] == EMBEDDED_STATE:
        return
    state, names = (Path(p).expanduser() for p in paths)
    for key, path in (("update.optimizer_state", state), ("update.optimizer_param_names", names)):
        default = (" (the default: optimizer_param_names.json beside the state)"
                   if path is names and not update.get("optimizer_param_names") else "")
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"{key}: {str(path)!r} {what}{default}")
        try:
            with open(path, "rb") as f:
                head = f.read(1)
        except OSError as err:
            raise ConfigError(f"{key}: cannot read {str(path)!r} ({err.strerror or err})") from err
        if path is state and not (head == b"\x80" or zipfile.is_zipfile(path)):
            raise ConfigError(f"{key}: {str(path)!r} is not a torch.save file (neither a zip archive nor a "
                              "pickle): corrupt or truncated?")


def _check_reward(reward: dict) -> None:
    import importlib.util

    name, function = reward["name"], reward.get("function", "")
    if name == "custom":
        target, sep, func = function.rpartition(":")
        if not sep or not target or not func:
            raise ConfigError(f"reward.function: {function!r} is not 'module:function' or 'path/to/file.py:function' "
                              "(needed by reward.name: custom)")
        _check_reward_source(target, func)
    elif function:
        raise ConfigError(f"reward.function is set but reward.name is {name!r}, not 'custom'")
    if name in ("math", "think_answer_math") and importlib.util.find_spec("math_verify") is None:
        raise ConfigError(f"reward.name: {name!r} needs the math-verify package (pip install math-verify)")


# keys that were renamed: a config that still uses the old name gets told the new one
RENAMED = {
    ("update", "loss_normalization"): "update.loss_type (TRL and verl names; token_mean and seq_mean_token_mean "
                                      "keep working, seq_mean_token_sum_max_len is now "
                                      "seq_mean_token_sum_prompt_max_len)",
    ("generation", "autocast_dtype"): "model.precision (float32 | bfloat16; it now sets the precision of every "
                                      "model pass: generation, X, Y, the directional pass and SNIS)",
}


def check_renamed(config: dict) -> None:
    """Before the schema: a renamed key gets a message naming its new name."""
    for (section, key), new in RENAMED.items():
        if key in (config.get(section) or {}):
            raise ConfigError(f"{section}.{key}: renamed to {new}")


def _check_loss(config: dict) -> None:
    """The settings a loss type needs (entropy_probe.losses) are set."""
    upd = config["update"]
    needs = {"bnpo": "micro_batch_size", "seq-mean-token-sum-norm": "loss_scale_factor",
             "seq_mean_token_sum_norm": "loss_scale_factor"}
    key = needs.get(upd["loss_type"])
    if key and not upd[key]:
        raise ConfigError(f"update.{key}: must be > 0 for update.loss_type {upd['loss_type']!r}")


def _check_variants(config: dict) -> None:
    """update.variants: names, and each variant's effective update passes the main update's checks."""
    from . import variants

    if config["update"].get("variants") and config["update"]["optimizer"] == "checkpoint_diff":
        raise ConfigError("update.variants: a variant is another update rule on the U batch, and with "
                          "update.optimizer checkpoint_diff there is none (v is the trainer's step): drop the variants")

    def check_update(effective: dict) -> None:
        _check_loss(effective)
        _check_optimizer_state(effective)

    try:
        variants.check(config, check_update)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_config(config: dict) -> None:
    """Raise ConfigError on the first inconsistent value."""
    batch, gen, model = config["batch_config"], config["generation"], config["model"]
    _check_loss(config)
    check_checkpoint_config(config)
    if model["name_or_path"] != EMBEDDED:
        _check_checkpoint(model["name_or_path"], "model.name_or_path", adapter=False)
    if model.get("adapter_path"):
        if model["name_or_path"] == EMBEDDED:
            raise ConfigError("model.adapter_path: an adapter needs a checkpoint in model.name_or_path (the embedded "
                              "policy is built by the run; to put an adapter on it, give its directory)")
        _check_checkpoint(model["adapter_path"], "model.adapter_path", adapter=True)
    checkpoint = model.get("checkpoint") or model.get("checkpoints")  # checked by check_checkpoint_config
    if model.get("trainable", "auto") == "adapters" and not model.get("adapter_path") and not checkpoint:
        raise ConfigError("model.trainable: 'adapters' needs model.adapter_path")
    _check_data(config)
    _check_reward(config["reward"])
    _check_optimizer_state(config)
    _check_variants(config)
    if any(not s for s in gen.get("stop_strings", [])):
        raise ConfigError("generation.stop_strings: empty stop string")
    if batch["E_total_sequences"] < batch["G"]:
        raise ConfigError(
            f"batch_config.E_total_sequences: {batch['E_total_sequences']} is smaller than "
            f"batch_config.G = {batch['G']} (one prompt group)"
        )
    if config["estimator"]["baseline"] == "loo" and batch["G"] < 2:
        raise ConfigError("estimator.baseline: 'loo' needs batch_config.G >= 2")
    n_e = num_e_prompts(batch)
    u_size, e_size = dataset_size(config, "U"), dataset_size(config, "E")
    if u_size is not None and batch["B_U"] > u_size:
        raise ConfigError(f"batch_config.B_U: {batch['B_U']} distinct prompts > dataset size {u_size}")
    if e_size is not None and batch["E_sampling_mode"] == "distinct" and n_e > e_size:
        raise ConfigError(
            f"batch_config.E_total_sequences: distinct mode needs ceil({batch['E_total_sequences']}"
            f"/{batch['G']}) = {n_e} prompts > dataset size {e_size}"
        )
    if batch["E_num_shards"] > n_e:
        raise ConfigError(f"batch_config.E_num_shards: {batch['E_num_shards']} shards > {n_e} E prompts")
    if batch["U_num_shards"] > batch["B_U"]:
        raise ConfigError(f"batch_config.U_num_shards: {batch['U_num_shards']} shards > B_U = {batch['B_U']}")
    if gen["top_p"] <= 0 or gen["top_p"] > 1:  # the schema checks this too; kept for direct callers
        raise ConfigError(f"generation.top_p: {gen['top_p']} is outside (0, 1]")


SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def _fill_defaults(schema: dict, instance: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = json.loads(json.dumps(sub["default"]))
        if isinstance(instance.get(key), dict):
            _fill_defaults(sub, instance[key])


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """A config file (or {}) plus ``overrides``, validated against the workflow's schema, with
    defaults filled in and cross-checked: what Snakemake's rules see, for running a stage by hand."""
    import jsonschema
    import yaml

    config = yaml.safe_load(Path(path).read_text()) if path else {}
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    check_renamed(config)
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    _fill_defaults(schema, config)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "(top level)"
        raise ConfigError(f"{where}: {error.message}")
    check_config(config)
    return config


def with_training_eta(etas: list[float], training_eta: float | None) -> list[float]:
    """``etas`` with the η of the trainer's step (v's ``training_eta``: a checkpoint's learning
    rate, or 1 for a checkpoint difference) added in order when no η of the list is it."""
    etas = [float(e) for e in etas]
    if training_eta is None or any(math.isclose(e, training_eta, rel_tol=1e-9) for e in etas):
        return etas
    return sorted(etas + [float(training_eta)])


def sweep_etas(estimator: dict, training_eta: float | None = None) -> list[float]:
    """The η values the SNIS pass evaluates: eta_list (and the training η, if any), plus −η for
    each when central differences are asked for, sorted."""
    etas = set(with_training_eta(estimator["eta_list"], training_eta))
    if estimator["central_difference"]:
        etas |= {-e for e in etas}
    return sorted(etas)
