# Whole-batch plug-ins (E) and objective weights (U), then the X and Y gradient shards and their
# reduction (DESIGN §2 "X = ∇H", "Y and v"). Stages: entropy_probe/stages/teacher_force.py.
U_OBJECTIVE = f"{RESULTS}/estimates/u_objective.safetensors"


rule e_stats:
    input:
        policy=POLICY,
        rollouts=shard_paths(f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors", "E"),
    output:
        stats=f"{RESULTS}/estimates/e_stats.json",
    log:
        f"{RESULTS}/logs/e_stats.log",
    benchmark:
        benchmark_path("e_stats")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("e_stats"),
    script:
        STAGE


# Advantages and loss coefficients of the whole U batch; stops the run when the U batch gives an
# SGD update no gradient.
rule u_objective:
    input:
        policy=POLICY,
        rollouts=shard_paths(f"{RESULTS}/rollouts/U/shard_{{shard}}.safetensors", "U"),
    output:
        objective=U_OBJECTIVE,
    log:
        f"{RESULTS}/logs/u_objective.log",
    benchmark:
        benchmark_path("u_objective")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("u_objective"),
    script:
        STAGE


rule teacher_force_x:
    input:
        rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
        policy=POLICY,
        batch=rules.e_stats.output.stats,
        # order only: a U batch without signal stops the run before any teacher forcing, and a
        # change of the U side never reruns X (ancient: its time stamp is not compared)
        after_u_objective=ancient(U_OBJECTIVE),
    output:
        # gradient-sized (float32): only the reduction reads it, so it goes once X is reduced
        gradient=temp(f"{RESULTS}/teacher_force/{{kind}}/shard_{{shard}}.safetensors"),
    log:
        f"{RESULTS}/logs/teacher_force_{{kind}}_{{shard}}.log",
    benchmark:
        benchmark_path("teacher_force_{kind}_{shard}")
    wildcard_constraints:
        kind="X",
    conda:
        "../envs/probe.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=GPU,
    params:
        values=params_of("teacher_force_x"),
    script:
        STAGE


rule teacher_force_y:
    input:
        rollout=f"{RESULTS}/rollouts/U/shard_{{shard}}.safetensors",
        policy=POLICY,
        batch=U_OBJECTIVE,
    output:
        gradient=f"{RESULTS}/teacher_force/{{kind}}/shard_{{shard}}.safetensors",
    log:
        f"{RESULTS}/logs/teacher_force_{{kind}}_{{shard}}.log",
    benchmark:
        benchmark_path("teacher_force_{kind}_{shard}")
    wildcard_constraints:
        kind="Y",
    conda:
        "../envs/probe.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=GPU,
    params:
        values=params_of("teacher_force_y"),
    script:
        STAGE


rule reduce_gradients:
    input:
        partials=lambda wc: shard_paths(
            f"{RESULTS}/teacher_force/{wc.kind}/shard_{{shard}}.safetensors",
            "E" if wc.kind == "X" else "U",
        ),
    output:
        reduced=f"{RESULTS}/gradients/{{kind}}.safetensors",
    log:
        f"{RESULTS}/logs/reduce_gradients_{{kind}}.log",
    benchmark:
        benchmark_path("reduce_gradients_{kind}")
    wildcard_constraints:
        kind="X|Y",
    conda:
        "../envs/probe.yaml"
    threads: 1
    script:
        STAGE
