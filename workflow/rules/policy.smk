if EMBEDDED_MODEL:

    rule build_policy:
        output:
            directory(f"{RESULTS}/policy"),
        params:
            toy=config["toy"],
        conda:
            "../envs/probe.yaml"
        log:
            f"{RESULTS}/logs/build_policy.log",
        script:
            "../../scripts/build_policy.py"

else:

    # Resolves the configured model (a hub id is fetched here: a local rule, where the network is)
    # and adapter, and fingerprints them; every later rule loads the policy from this spec.
    localrules:
        policy_spec,

    rule policy_spec:
        input:
            local_model_files(),
        output:
            f"{RESULTS}/policy.json",
        params:
            model=config["model"],
        conda:
            "../envs/probe.yaml"
        log:
            f"{RESULTS}/logs/policy_spec.log",
        script:
            "../../scripts/policy_spec.py"
