rule update_vector:
    input:
        f"{RESULTS}/gradients/Y.safetensors",
    output:
        f"{RESULTS}/update/v.safetensors",
    params:
        cfg=sections(update=["optimizer"]),
    log:
        f"{RESULTS}/logs/update_vector.log",
    script:
        "../../scripts/update_vector.py"
