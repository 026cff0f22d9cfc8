"""The defaults the committed transfer study chose (study/summary.json, "defaults"); tests keep them equal.

    LoRA targets   the attention sub-layers' projections (q, k, v, o on Llama), found by structure:
                   the study's best Trans-PEFT setting was on q,k,v,o
    p_c, p_i       knowledge dropping off, knowledge masking 0.05: the setting that transferred best
                   while costing at most 2 points of exact match on the old base
    re-tune        100 steps: the knee of the re-tune curve, where re-tuned adapters reach 95 % of
                   fine-tuning on the new base on both updates

Change them by re-running the study (`dvc repro study`), not by hand.
"""

P_C = 0.0
P_I = 0.05
RETUNE_STEPS = 100
ALL_LINEAR = "all-linear"  # target_modules=("all-linear",): every linear layer instead of the attention projections
