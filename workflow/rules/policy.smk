# The policy every later stage loads: the embedded tiny policy (built and trained here), or the
# spec of a configured model (resolved checkpoint and adapter, fingerprinted).
if EMBEDDED_MODEL:

    rule build_policy:
        output:
            directory(f"{RESULTS}/policy"),
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
            "../../scripts/build_policy.py"

else:

    # A hub id is fetched here: a local rule, where the network is.
    localrules:
        policy_spec,

    rule policy_spec:
        input:
            local_model_files,
        output:
            f"{RESULTS}/policy.json",
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
            "../../scripts/policy_spec.py"
