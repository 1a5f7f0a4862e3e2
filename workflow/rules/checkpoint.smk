# Trainer checkpoints (model.checkpoint, update.optimizer: checkpoint_diff, model.checkpoints): the
# probe's own AdamW step against the trainer's, and, before any job runs, the check that every
# optimizer state used fits its model. Stage: entropy_probe/stages/checkpoint.py.
if COMPARES_STEPS:

    rule step_comparison:
        input:
            unpack(update_state_inputs),
            Y=f"{RESULTS}/gradients/Y.safetensors",
            X=f"{RESULTS}/gradients/X.safetensors",
            v=rules.update_vector.output.v,
            policy=POLICY,
        output:
            comparison=STEP_COMPARISON,
        log:
            f"{RESULTS}/logs/step_comparison.log",
        benchmark:
            benchmark_path("step_comparison")
        conda:
            "../envs/probe.yaml"
        threads: 1
        params:
            values=params_of("step_comparison"),
        script:
            STAGE


# An optimizer state that does not fit its model fails here, in one line naming the file and the
# first mismatching tensor, before any job runs (torch is loaded in a subprocess: the parse stays
# torch-free; the model is built without weights, the state memory-mapped).
STATE_CHECKS = state_checks(config)


onstart:
    if SKIPPED_VARIANTS:
        logger.warning(f"NOTE: {SKIPPED_VARIANTS}")
    if STATE_CHECKS:
        import subprocess

        checked = subprocess.run(
            [sys.executable, "-m", "entropy_probe", "check-checkpoints", *STATE_CHECKS]
        )
        if checked.returncode:
            raise WorkflowError(
                "a trainer checkpoint does not fit (the ERROR line above); no job was run"
            )
