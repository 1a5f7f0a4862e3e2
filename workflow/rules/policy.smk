# The policy every later stage loads: the embedded tiny policy (built and trained here), or the
# spec of a configured model (resolved checkpoint and adapter, fingerprinted).
# Stages: entropy_probe/stages/policy.py.
if EMBEDDED_MODEL:

    rule build_policy:
        output:
            policy=directory(f"{RESULTS}/policy"),
        log:
            f"{RESULTS}/logs/build_policy.log",
        benchmark:
            benchmark_path("build_policy")
        conda:
            "../envs/probe.yaml"
        threads: 1
        params:
            values=params_of("build_policy"),
        script:
            STAGE

else:

    # A hub id is fetched here: a local rule, where the network is.
    localrules:
        policy_spec,

    rule policy_spec:
        input:
            local_model_files,
        output:
            spec=f"{RESULTS}/policy.json",
        log:
            f"{RESULTS}/logs/policy_spec.log",
        benchmark:
            benchmark_path("policy_spec")
        conda:
            "../envs/probe.yaml"
        threads: 1
        params:
            values=params_of("policy_spec"),
        script:
            STAGE
