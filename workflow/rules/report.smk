# The report: summary.json, summary.txt, plot.png and the report's landing page; the update
# variants compared; over a trainer's run (model.checkpoints) the trajectory.
# Stages: entropy_probe/stages/report.py.
rule summary:
    input:
        unpack(summary_inputs),
        delta_h1=rules.delta_h1.output.report,
        delta_h_snis=rules.delta_h_snis.output.report,
        # per-group contributions of δH₁ and of the SNIS ΔH: the linearity ratio's error bar
        directional=shard_paths(
            f"{RESULTS}/directional/shard_{{shard}}.safetensors", "E"
        ),
        snis=shard_paths(f"{RESULTS}/snis/shard_{{shard}}.safetensors", "E"),
        # what the model jobs cost (their headers): summary.json's cost account
        costed=costed_inputs,
    output:
        **(
            {
                "variants_table": report(
                    f"{RESULTS}/variants.txt",
                    caption="../report/variants.rst",
                    category="Update variants",
                ),
                "variants_plot": report(
                    f"{RESULTS}/variants.png",
                    caption="../report/variants_plot.rst",
                    category="Update variants",
                ),
                # each variant's δH₁ and ΔH, from the main reductions (delta_h1, delta_h_snis)
                "variant_delta_h1": variant_files(
                    f"{RESULTS}/variants/{{variant}}/delta_h1.json"
                ),
                "variant_delta_h_snis": variant_files(
                    f"{RESULTS}/variants/{{variant}}/delta_h_snis.json", None, SNIS_VARIANTS
                ),
            }
            if VARIANTS
            else {}
        ),
        summary_json=f"{RESULTS}/summary.json",
        summary_table=report(
            f"{RESULTS}/summary.txt",
            caption="../report/table.rst",
            category="Entropy change",
        ),
        summary_plot=report(
            f"{RESULTS}/plot.png",
            caption="../report/plot.rst",
            category="Entropy change",
        ),
        landing=f"{RESULTS}/report/landing.rst",
    log:
        f"{RESULTS}/logs/summary.log",
    benchmark:
        benchmark_path("summary")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("summary"),
    script:
        STAGE


if PAIR_CONFIGS:

    rule trajectory:
        input:
            summaries=every_run(rules.summary.output.summary_json),
        output:
            trajectory_json=f"{RESULTS_ROOT}/trajectory.json",
            trajectory_table=report(
                f"{RESULTS_ROOT}/trajectory.txt",
                caption="../report/trajectory.rst",
                category="Entropy over training",
            ),
            trajectory_plot=report(
                f"{RESULTS_ROOT}/trajectory.png",
                caption="../report/trajectory.rst",
                category="Entropy over training",
            ),
            landing=f"{RESULTS_ROOT}/report/trajectory.rst",
        log:
            f"{RESULTS_ROOT}/logs/trajectory.log",
        benchmark:
            f"{RESULTS_ROOT}/benchmarks/trajectory.tsv"
        conda:
            "../envs/probe.yaml"
        threads: 1
        script:
            STAGE
