"""MoE-CL: continual instruction tuning of a frozen decoder LLM with shared + per-task LoRA experts.

Layout (library pieces, then the recipe that uses them):
    config.py       typed experiment schema, YAML + dotted overrides
    moe.py          the MoE-CL layer: LoRA experts, token-wise gate, gradient reversal, discriminator
    model.py        MoECLModel: a Hugging Face decoder with MoE-CL MLPs, losses, scoring, generation
    base.py         loading the frozen base and tokenizer (builtin.py: the bundled tiny/demo bases)
    data.py         task formats, validation, prompts, tokenization, batches
    evaluate.py     accuracy by option scoring or exact match
    metrics.py      accuracy matrix, ACC / BWT / FWT, table and heatmap
    checkpoint.py   run folder, adapter files, stage manifests
    distributed.py  the one distributed boundary (single process, DeepSpeed ZeRO)
    monitor.py      TensorBoard
    recipe.py       a stage: setup -> train -> evaluate -> save; a sequence of stages
    cli.py          python -m trainer {sequence,stage,evaluate,report}
"""
