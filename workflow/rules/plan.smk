# The prompt sets (rendered, tokenized, filtered by data.max_prompt_tokens) and the batch plan,
# which draws prompt ids from them; the rollouts read the same prepared files.
if probe_data.source_kind(config["data"]["source"]) == "hub":

    localrules:
        prepare_data,  # a hub dataset is downloaded: where Snakemake runs, with the network


rule prepare_data:
    input:
        files=probe_data.input_files(config["data"]),
        policy=POLICY_DIR,
    output:
        summary=DATA_SUMMARY,
        splits=list(DATA_FILES.values()),
    params:
        data=config["data"],
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/prepare_data.log",
    script:
        "../../scripts/prepare_data.py"


rule plan:
    input:
        data=DATA_SUMMARY,
    output:
        f"{RESULTS}/plan.json",
    params:
        cfg=sections("batch_config"),
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/plan.log",
    script:
        "../../scripts/plan.py"
