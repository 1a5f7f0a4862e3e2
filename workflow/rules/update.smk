# The update vector v (DESIGN §2 "Y and v"). With update.optimizer: adamw and a saved state, the
# state file and its names file are inputs (for optimizer_state: embedded they lie inside the
# policy directory, which is an input anyway).
from entropy_probe.optimizer_state import resolve_state_paths

try:
    UPDATE_STATE_PATHS = resolve_state_paths(config["update"], POLICY_DIR, EMBEDDED_MODEL)
except ValueError as err:
    raise WorkflowError(f"Invalid config: {err}")


def update_state_inputs(wildcards):
    if UPDATE_STATE_PATHS is None or config["update"]["optimizer_state"] == "embedded":
        return {}
    state, names = UPDATE_STATE_PATHS
    return {"optimizer_state": state, "optimizer_param_names": names}


rule update_vector:
    input:
        unpack(update_state_inputs),
        Y=f"{RESULTS}/gradients/Y.safetensors",
        policy=POLICY_DIR,
    output:
        f"{RESULTS}/update/v.safetensors",
    params:
        cfg=sections(
            model=["name_or_path", "dtype"],
            update=["optimizer", "optimizer_state", "optimizer_param_names", "max_grad_norm"],
        ),
    log:
        f"{RESULTS}/logs/update_vector.log",
    script:
        "../../scripts/update_vector.py"


rule u_jackknife:
    input:
        unpack(update_state_inputs),
        X=f"{RESULTS}/gradients/X.safetensors",
        Y=shard_paths(f"{RESULTS}/teacher_force/Y/shard_{{shard}}.safetensors", "U"),
        policy=POLICY_DIR,
    output:
        f"{RESULTS}/estimates/u_jackknife.json",
    params:
        cfg=rules.update_vector.params.cfg,
    log:
        f"{RESULTS}/logs/u_jackknife.log",
    script:
        "../../scripts/u_jackknife.py"
