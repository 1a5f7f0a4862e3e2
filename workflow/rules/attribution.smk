# Where δH₁ comes from: the exact split of X·v over the E tokens (from the directional shards'
# per-token derivatives) and over the U tokens (a forward pass over the U shards along J·X,
# J = ∂v/∂Y the linearized optimizer step), the U-batch SE of δH₁ and the covariance view.
# Stage: entropy_probe/stages/attribution.py.
rule attribution:
    input:
        unpack(update_state_inputs),
        policy=POLICY,
        X=f"{RESULTS}/gradients/X.safetensors",
        Y=f"{RESULTS}/gradients/Y.safetensors",
        v=rules.update_vector.output.v,
        u_objective=U_OBJECTIVE,
        e_rollouts=shard_paths(f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors", "E"),
        directional=shard_paths(
            f"{RESULTS}/directional/shard_{{shard}}.safetensors", "E"
        ),
        u_rollouts=shard_paths(f"{RESULTS}/rollouts/U/shard_{{shard}}.safetensors", "U"),
    output:
        e_tokens=f"{RESULTS}/attribution/E_tokens.safetensors",
        u_tokens=f"{RESULTS}/attribution/U_tokens.safetensors",
        summary=f"{RESULTS}/attribution/attribution.json",
        table=report(
            f"{RESULTS}/attribution.txt",
            caption="../report/attribution.rst",
            category="Attribution",
        ),
    log:
        f"{RESULTS}/logs/attribution.log",
    benchmark:
        benchmark_path("attribution")
    conda:
        "../envs/probe.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=GPU,
    params:
        values=params_of("attribution"),
    script:
        STAGE
