rule directional:
    input:
        rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
        policy=POLICY_DIR,
        v=rules.update_vector.output[0],
    output:
        f"{RESULTS}/directional/shard_{{shard}}.safetensors",
    params:
        cfg=sections("batch_config", "generation", "model", estimator=ESTIMATOR_KEYS),
    resources:
        gpu=GPU,
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/directional_{{shard}}.log",
    script:
        "../../scripts/directional.py"


rule delta_h1:
    input:
        X=f"{RESULTS}/gradients/X.safetensors",
        v=rules.update_vector.output[0],
        directional=shard_paths(f"{RESULTS}/directional/shard_{{shard}}.safetensors", "E"),
    output:
        json=f"{RESULTS}/delta_h1.json",
        table=f"{RESULTS}/delta_h1.txt",
    params:
        cfg=sections(batch_config=["G"], estimator=["eta_list"]),
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/delta_h1.log",
    script:
        "../../scripts/delta_h1.py"


rule snis_shard:
    input:
        rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
        policy=POLICY_DIR,
        v=rules.update_vector.output[0],
    output:
        f"{RESULTS}/snis/shard_{{shard}}.safetensors",
    params:
        cfg=sections("batch_config", "generation", "model", estimator=["eta_list", "central_difference", "param_filter"]),
    resources:
        gpu=GPU,
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/snis_shard_{{shard}}.log",
    script:
        "../../scripts/snis_shard.py"


rule delta_h:
    input:
        shard_paths(f"{RESULTS}/snis/shard_{{shard}}.safetensors", "E"),
    output:
        f"{RESULTS}/delta_h.json",
    params:
        cfg=sections(batch_config=["G"], estimator=["normalization"]),
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/delta_h.log",
    script:
        "../../scripts/delta_h.py"


if EXACT_REFERENCE:

    rule exact_reference:
        input:
            policy=POLICY_DIR,
            v=rules.update_vector.output[0],
            data=DATA_SUMMARY,
        output:
            f"{RESULTS}/estimates/exact.json",
        params:
            cfg=sections("data", "generation", "model", estimator=["normalization", "eta_list", "central_difference"]),
        conda:
            "../envs/probe.yaml"
        log:
            f"{RESULTS}/logs/exact_reference.log",
        script:
            "../../scripts/exact_reference.py"


rule summary:
    input:
        unpack(lambda wc: {"exact": rules.exact_reference.output[0]} if EXACT_REFERENCE else {}),
        delta_h1=rules.delta_h1.output.json,
        delta_h=rules.delta_h.output[0],
        u_jackknife=rules.u_jackknife.output[0],
    output:
        json=f"{RESULTS}/summary.json",
        table=f"{RESULTS}/summary.txt",
        plot=report(f"{RESULTS}/plot.png", caption="../report/plot.rst", category="Entropy change"),
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/summary.log",
    script:
        "../../scripts/summary.py"
