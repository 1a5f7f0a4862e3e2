# δH₁(η) = η·X·v with its error bars, ΔH(η) with θ's nucleus by SNIS, the exact reference where
# the policy can be enumerated, and the report (with the sampler's own ΔH of fresh.smk).
rule directional:
    input:
        rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
        policy=POLICY,
        v=rules.update_vector.output[0],
    output:
        f"{RESULTS}/directional/shard_{{shard}}.safetensors",
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
        "../../scripts/directional.py"


rule delta_h1:
    input:
        X=f"{RESULTS}/gradients/X.safetensors",
        v=rules.update_vector.output[0],
        directional=shard_paths(
            f"{RESULTS}/directional/shard_{{shard}}.safetensors", "E"
        ),
    output:
        json=f"{RESULTS}/delta_h1.json",
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
        "../../scripts/delta_h1.py"


rule snis_shard:
    input:
        rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
        policy=POLICY,
        v=rules.update_vector.output[0],
    output:
        f"{RESULTS}/snis/shard_{{shard}}.safetensors",
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
        "../../scripts/snis_shard.py"


rule delta_h_snis:
    input:
        shard_paths(f"{RESULTS}/snis/shard_{{shard}}.safetensors", "E"),
    output:
        f"{RESULTS}/delta_h_snis.json",
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
        "../../scripts/delta_h_snis.py"


if EXACT_REFERENCE:

    # On the CPU whatever model.device says (a small job; on a cluster it runs on a CPU node).
    rule exact_reference:
        input:
            policy=POLICY,
            v=rules.update_vector.output[0],
            data=PREPARED["E"],
        output:
            f"{RESULTS}/estimates/exact.json",
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
            "../../scripts/exact_reference.py"


rule summary:
    input:
        unpack(summary_inputs),
        delta_h1=rules.delta_h1.output.json,
        delta_h_snis=rules.delta_h_snis.output[0],
        # per-group contributions of δH₁ and of the SNIS ΔH: the linearity ratio's error bar
        directional=shard_paths(
            f"{RESULTS}/directional/shard_{{shard}}.safetensors", "E"
        ),
        snis=shard_paths(f"{RESULTS}/snis/shard_{{shard}}.safetensors", "E"),
    output:
        **(
            {
                "variants_table": report(
                    f"{RESULTS}/variants.txt",
                    caption="../report/variants.rst",
                    category="Update variants",
                ),
                "variants_plot": report(
                    f"{RESULTS}/variants.png",
                    caption="../report/variants_plot.rst",
                    category="Update variants",
                ),
            }
            if VARIANTS
            else {}
        ),
        json=f"{RESULTS}/summary.json",
        table=report(
            f"{RESULTS}/summary.txt",
            caption="../report/table.rst",
            category="Entropy change",
        ),
        plot=report(
            f"{RESULTS}/plot.png",
            caption="../report/plot.rst",
            category="Entropy change",
        ),
    log:
        f"{RESULTS}/logs/summary.log",
    benchmark:
        benchmark_path("summary")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("summary"),
    script:
        "../../scripts/summary.py"
