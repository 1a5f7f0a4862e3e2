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
