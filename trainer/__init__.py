"""MoE-CL: continual instruction tuning of a frozen decoder LLM with shared + per-task LoRA experts.

Layout (library pieces, then the recipe that uses them):
    config.py       typed experiment schema, YAML + dotted overrides
    moe.py          the MoE-CL layer: LoRA experts, token-wise gate, gradient reversal, discriminator
    model.py        MoECLModel: a Hugging Face decoder with MoE-CL MLPs, losses, scoring, generation
    base.py         loading the frozen base and tokenizer (builtin.py: the bundled tiny/demo bases)
    data.py         task formats, validation, prompts, tokenization, batches
    sources.py      your own data through `datasets` loaders with a column mapping (data.tasks)
    evaluate.py     accuracy by option scoring or exact match
    metrics.py      accuracy matrix, ACC / BWT / FWT, table and heatmap
    checkpoint.py   run folder, adapter files, stage manifests
    router.py       the task router: which task a request belongs to, without a task id
    distributed.py  the one distributed boundary (single process, DeepSpeed ZeRO; torchrun, deepspeed, srun)
    partitioned.py  building the frozen base directly as ZeRO-3 shards
    atomic.py       atomic writes; runlock.py: one run per folder; stopping.py: stop signals
    monitor.py      TensorBoard, progress output
    recipe.py       a stage: setup -> train -> evaluate -> save; a sequence of stages
    adapters.py     extract, merge, export and serve (predict) expert adapters
    slurm.py        one chained SLURM job per stage (submit)
    cli.py          python -m trainer (or moecl) {config,sequence,stage,evaluate,submit,report,extract,merge,
                    export,predict,inspect}
"""
