# What-if over update rules (update.variants): per variant its own v, its directional pass and
# (snis: true) its SNIS pass over the same E batch and X (X is never recomputed); the report stage reduces them and
# compares the variants (results/variants.txt, .png). Stages: entropy_probe/stages/variants.py,
# the main teacher_force_y and reduce_gradients stages for a variant's own Y.
if VARIANTS:

    wildcard_constraints:
        variant="|".join(VARIANTS),

    # The U objective and Y of a loss that differs from the main one (shared by the variants
    # that have it).
    if OBJECTIVE_CONFIG:

        rule variant_u_objective:
            input:
                policy=POLICY,
                rollouts=shard_paths(
                    f"{RESULTS}/rollouts/U/shard_{{shard}}.safetensors", "U"
                ),
            output:
                objective=f"{RESULTS}/variants/objectives/{{objective}}/u_objective.safetensors",
            log:
                f"{RESULTS}/logs/variant_u_objective_{{objective}}.log",
            benchmark:
                benchmark_path("variant_u_objective_{objective}")
            wildcard_constraints:
                objective="|".join(OBJECTIVE_CONFIG),
            conda:
                "../envs/probe.yaml"
            threads: 1
            params:
                values=objective_params("variant_u_objective"),
            script:
                STAGE

        rule variant_teacher_force_y:
            input:
                rollout=f"{RESULTS}/rollouts/U/shard_{{shard}}.safetensors",
                policy=POLICY,
                batch=rules.variant_u_objective.output.objective,
            output:
                gradient=f"{RESULTS}/variants/objectives/{{objective}}/teacher_force/{{kind}}/shard_{{shard}}.safetensors",
            log:
                f"{RESULTS}/logs/variant_teacher_force_{{objective}}_{{kind}}_{{shard}}.log",
            benchmark:
                benchmark_path("variant_teacher_force_{objective}_{kind}_{shard}")
            wildcard_constraints:
                objective="|".join(OBJECTIVE_CONFIG),
                kind="Y",
                shard=r"\d+",
            conda:
                "../envs/probe.yaml"
            threads: MODEL_THREADS
            resources:
                gpu=GPU,
            params:
                values=objective_params("variant_teacher_force_y"),
            script:
                STAGE

        rule variant_reduce_y:
            input:
                partials=lambda wc: shard_paths(
                    f"{RESULTS}/variants/objectives/{wc.objective}/teacher_force/{wc.kind}/shard_{{shard}}.safetensors",
                    "U",
                ),
            output:
                reduced=f"{RESULTS}/variants/objectives/{{objective}}/gradients/{{kind}}.safetensors",
            log:
                f"{RESULTS}/logs/variant_reduce_{{objective}}_{{kind}}.log",
            benchmark:
                benchmark_path("variant_reduce_{objective}_{kind}")
            wildcard_constraints:
                objective="|".join(OBJECTIVE_CONFIG),
                kind="Y",
            conda:
                "../envs/probe.yaml"
            threads: 1
            script:
                STAGE

    rule variant_update_vector:
        input:
            unpack(variant_state_inputs),
            Y=variant_y,
            policy=POLICY,
        output:
            v=f"{RESULTS}/variants/{{variant}}/v.safetensors",
        log:
            f"{RESULTS}/logs/variant_update_vector_{{variant}}.log",
        benchmark:
            benchmark_path("variant_update_vector_{variant}")
        conda:
            "../envs/probe.yaml"
        threads: 1
        params:
            values=variant_params("variant_update_vector"),
        script:
            STAGE

    # The directional sums of one E shard along the variant's v (the E-side SE of its δH₁).
    rule variant_directional:
        input:
            rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
            policy=POLICY,
            v=rules.variant_update_vector.output.v,
        output:
            sums=f"{RESULTS}/variants/{{variant}}/directional/shard_{{shard}}.safetensors",
        log:
            f"{RESULTS}/logs/variant_directional_{{variant}}_{{shard}}.log",
        benchmark:
            benchmark_path("variant_directional_{variant}_{shard}")
        conda:
            "../envs/probe.yaml"
        threads: MODEL_THREADS
        resources:
            gpu=GPU,
        params:
            values=variant_params("variant_directional"),
        script:
            STAGE

    # The SNIS pass of one E shard at θ + η·v for every η (the variant's ΔH(η)): only for the
    # variants that ask for it (snis: true), a forward pass over the shard per point of the sweep.
    if SNIS_VARIANTS:

        rule variant_snis_shard:
            input:
                rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
                policy=POLICY,
                v=rules.variant_update_vector.output.v,
            output:
                weights=f"{RESULTS}/variants/{{variant}}/snis/shard_{{shard}}.safetensors",
            log:
                f"{RESULTS}/logs/variant_snis_shard_{{variant}}_{{shard}}.log",
            benchmark:
                benchmark_path("variant_snis_shard_{variant}_{shard}")
            wildcard_constraints:
                variant="|".join(SNIS_VARIANTS),
            conda:
                "../envs/probe.yaml"
            threads: MODEL_THREADS
            resources:
                gpu=GPU,
            params:
                values=variant_params("variant_snis_shard"),
            script:
                STAGE
