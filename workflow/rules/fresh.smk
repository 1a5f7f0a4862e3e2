# The sampler's own entropy change ΔH_sampler(η) (DESIGN §2b): every E response slot redrawn at
# θ + ηv with the same sampling noise, under θ + ηv's own sampler, one job per (η, E shard); then
# the paired reduction over the whole E batch. Only when estimator.fresh_etas is not [].
# Stages: entropy_probe/stages/fresh.py.
if FRESH_ETAS:

    rule fresh_rollout:
        input:
            rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
            plan=f"{RESULTS}/plan/E.json",
            policy=POLICY,
            v=rules.update_vector.output.v,
        output:
            redrawn=f"{RESULTS}/fresh/eta_{{eta}}/shard_{{shard}}.safetensors",
        log:
            f"{RESULTS}/logs/fresh_rollout_{{eta}}_{{shard}}.log",
        benchmark:
            benchmark_path("fresh_rollout_{eta}_{shard}")
        wildcard_constraints:
            eta=r"-?[0-9][0-9.e+-]*",
            shard=r"\d+",
        conda:
            "../envs/probe.yaml"
        threads: MODEL_THREADS
        resources:
            gpu=GPU,
        params:
            values=params_of("fresh_rollout"),
        script:
            STAGE

    rule delta_h_sampler:
        input:
            redrawn=expand(
                f"{RESULTS}/fresh/eta_{{eta}}/shard_{{shard}}.safetensors",
                eta=[eta_tag(eta) for eta in FRESH_ETAS],
                shard=[
                    f"{i:03d}" for i in range(config["batch_config"]["E_num_shards"])
                ],
                allow_missing=True,
            ),
            # the same E batch with θ's nucleus held fixed: the decomposition of the sampler's change
            weights=shard_paths(f"{RESULTS}/snis/shard_{{shard}}.safetensors", "E"),
        output:
            report=f"{RESULTS}/delta_h_sampler.json",
        log:
            f"{RESULTS}/logs/delta_h_sampler.log",
        benchmark:
            benchmark_path("delta_h_sampler")
        conda:
            "../envs/probe.yaml"
        threads: 1
        params:
            values=params_of("delta_h_sampler"),
        script:
            STAGE
