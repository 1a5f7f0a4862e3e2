# Trainer checkpoints (model.checkpoint, update.optimizer: checkpoint_diff, model.checkpoints):
# the probe's own AdamW step against the trainer's, the report over a trajectory, and, before any
# job runs, the check that every optimizer state used fits its model.
if COMPARES_STEPS:

    rule step_comparison:
        input:
            unpack(update_state_inputs),
            Y=f"{RESULTS}/gradients/Y.safetensors",
            X=f"{RESULTS}/gradients/X.safetensors",
            v=rules.update_vector.output[0],
            policy=POLICY,
        output:
            STEP_COMPARISON,
        log:
            f"{RESULTS}/logs/step_comparison.log",
        conda:
            "../envs/probe.yaml"
        threads: 1
        params:
            values=params_of("step_comparison"),
        script:
            "../../scripts/step_comparison.py"


if PAIR_CONFIGS:

    rule trajectory:
        input:
            every_run(rules.summary.output.json),
        output:
            json=f"{RESULTS_ROOT}/trajectory.json",
            table=report(
                f"{RESULTS_ROOT}/trajectory.txt",
                caption="../report/trajectory.rst",
                category="Entropy over training",
            ),
            plot=report(
                f"{RESULTS_ROOT}/trajectory.png",
                caption="../report/trajectory.rst",
                category="Entropy over training",
            ),
        log:
            f"{RESULTS_ROOT}/logs/trajectory.log",
        conda:
            "../envs/probe.yaml"
        threads: 1
        params:
            values=rule_params(config, "trajectory"),
        script:
            "../../scripts/trajectory.py"


# An optimizer state that does not fit its model fails here, in one line naming the file and the
# first mismatching tensor, before any job runs (torch is loaded in a subprocess: the parse stays
# torch-free; the model is built without weights, the state memory-mapped).
STATE_CHECKS = state_checks(config)
if STATE_CHECKS:

    onstart:
        import subprocess

        checked = subprocess.run(
            [
                sys.executable,
                "-m",
                "entropy_probe.trainer_checkpoint",
                *STATE_CHECKS,
            ]
        )
        if checked.returncode:
            raise WorkflowError(
                "a trainer checkpoint does not fit (the ERROR line above); no job was run"
            )
