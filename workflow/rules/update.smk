# The update vector v (DESIGN §2 "Y and v") and the jackknife over U shards.
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
    conda:
        "../envs/probe.yaml"
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
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/u_jackknife.log",
    script:
        "../../scripts/u_jackknife.py"
