rule plan:
    input:
        POLICY_DIR if config["data"]["source"] == EMBEDDED else config["data"]["source"],
    output:
        f"{RESULTS}/plan.json",
    params:
        cfg=sections("batch_config"),
        dataset_size=DATASET_SIZE,
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/plan.log",
    script:
        "../../scripts/plan.py"
