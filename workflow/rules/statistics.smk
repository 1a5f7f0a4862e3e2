# δH₁(η) = η·X·v with its error bars, ΔH(η) with θ's nucleus by SNIS, and the exact reference where
# the policy can be enumerated. Stages: entropy_probe/stages/statistics.py.
rule directional:
    input:
        rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
        policy=POLICY,
        v=rules.update_vector.output.v,
    output:
        sums=f"{RESULTS}/directional/shard_{{shard}}.safetensors",
    log:
        f"{RESULTS}/logs/directional_{{shard}}.log",
    benchmark:
        benchmark_path("directional_{shard}")
    conda:
        "../envs/probe.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=GPU,
    params:
        values=params_of("directional"),
    script:
        STAGE


rule delta_h1:
    input:
        X=f"{RESULTS}/gradients/X.safetensors",
        v=rules.update_vector.output.v,
        directional=shard_paths(
            f"{RESULTS}/directional/shard_{{shard}}.safetensors", "E"
        ),
    output:
        report=f"{RESULTS}/delta_h1.json",
        table=f"{RESULTS}/delta_h1.txt",
    log:
        f"{RESULTS}/logs/delta_h1.log",
    benchmark:
        benchmark_path("delta_h1")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("delta_h1"),
    script:
        STAGE


rule snis_shard:
    input:
        rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
        policy=POLICY,
        v=rules.update_vector.output.v,
    output:
        weights=f"{RESULTS}/snis/shard_{{shard}}.safetensors",
    log:
        f"{RESULTS}/logs/snis_shard_{{shard}}.log",
    benchmark:
        benchmark_path("snis_shard_{shard}")
    conda:
        "../envs/probe.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=GPU,
    params:
        values=params_of("snis_shard"),
    script:
        STAGE


rule delta_h_snis:
    input:
        weights=shard_paths(f"{RESULTS}/snis/shard_{{shard}}.safetensors", "E"),
    output:
        report=f"{RESULTS}/delta_h_snis.json",
    log:
        f"{RESULTS}/logs/delta_h_snis.log",
    benchmark:
        benchmark_path("delta_h_snis")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("delta_h_snis"),
    script:
        STAGE


if EXACT_REFERENCE:

    # On the CPU whatever model.device says (a small job; on a cluster it runs on a CPU node).
    rule exact_reference:
        input:
            policy=POLICY,
            v=rules.update_vector.output.v,
            data_set=PREPARED["E"],
        output:
            exact_values=f"{RESULTS}/estimates/exact.json",
        log:
            f"{RESULTS}/logs/exact_reference.log",
        benchmark:
            benchmark_path("exact_reference")
        conda:
            "../envs/probe.yaml"
        threads: 1
        params:
            values=params_of("exact_reference"),
        script:
            STAGE
