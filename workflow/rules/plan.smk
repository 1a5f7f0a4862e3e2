# The prompt set of each split (rendered, tokenized, filtered by data.max_prompt_tokens) and the
# plan of each batch, which draws prompt ids from its split's set; the rollouts read the same
# prepared files. One job per split and per batch: a change on the U side leaves the E side alone.
# Stages: entropy_probe/stages/plan.py.
if probe_data.source_kind(config["data"]["source"]) == "hub":

    localrules:
        prepare_data,  # a hub dataset is downloaded: where Snakemake runs, with the network


rule prepare_data:
    input:
        files=lambda wc: probe_data.input_files(config["data"], SPLIT_OF_NAME[wc.split]),
        policy=POLICY,
    output:
        prompts=f"{RESULTS}/data/{{split}}.jsonl",
        report=f"{RESULTS}/data/{{split}}.json",
    log:
        f"{RESULTS}/logs/prepare_data_{{split}}.log",
    benchmark:
        benchmark_path("prepare_data_{split}")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("prepare_data"),
        split=lambda wc: SPLIT_OF_NAME[wc.split],
    script:
        STAGE


rule plan:
    input:
        prepared=lambda wc: PREPARED[wc.kind],
    output:
        batch_plan=f"{RESULTS}/plan/{{kind}}.json",
    log:
        f"{RESULTS}/logs/plan_{{kind}}.log",
    benchmark:
        benchmark_path("plan_{kind}")
    wildcard_constraints:
        kind="E|U",
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=lambda wc: params_of(f"plan_{wc.kind}", wc),
    script:
        STAGE
