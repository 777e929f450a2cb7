"""The experiment schema: grouped dataclasses read from YAML, with dotted command-line overrides.

Every field has a type and a default (or is required); unknown keys and wrong types are errors,
and every problem in a file is reported at once, each with what to change::

    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-4", "data.order=[agnews,yelp]"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Where stage outputs, metrics, TensorBoard logs and the resolved config go."""
    seed: int = 0
    """Seeds expert initialisation, data order, dropout and the validation split."""
    lock_stale_seconds: int = 600
    """A run holds RUN_DIR/run.lock while it writes, refreshing it every 30 s. A lock whose holder cannot
    be checked directly (another host, no SLURM job to ask about) is taken over once it is this old."""


@dataclass
class ModelConfig:
    path: str = ""
    """A local Hugging Face folder, or `builtin:<name>` (tiny-llama, tiny-qwen2, smollm2-135m-instruct)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the frozen base. auto: bfloat16 on a GPU; on a CPU bfloat16 if it has native bf16 matmuls
    (AVX512-BF16 or AMX) and the base's hidden size is at least 512 (where it is the faster), else
    float32. Under DeepSpeed it is also the training precision; expert, gate and discriminator master
    weights and optimizer state stay float32. float16 (GPUs without bf16: V100, T4) needs DeepSpeed, for its dynamic loss scaling."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained`; off unless you trust the model folder's code."""
    cache_dir: str = "~/.cache/moe-cl/models"
    """Where `builtin:` models are materialised once as plain Hugging Face folders."""


@dataclass
class ExpertsConfig:
    method: Literal["moe_cl", "moe_cl_no_gan", "seq_lora", "per_task_lora", "olora", "mocl"] = "moe_cl"
    """moe_cl: shared + per-task experts, gated, adversarial discriminator. Baselines on the same
    modules and budget: moe_cl_no_gan (no discriminator), seq_lora (one LoRA trained through every
    task), per_task_lora (a fresh LoRA per task, used with its task id), olora (O-LoRA: a LoRA per task,
    orthogonal to the earlier tasks' A, all of them summed at inference, no task id), mocl (MoCL: a LoRA
    and a key per task; every learned LoRA weighted per row by how well the row's mean token embedding
    matches each key, no task id)."""
    rank: int = 8
    """LoRA rank r of every expert (gate, up and down projections)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on each LoRA's input."""
    gate: Literal["shared", "per_task"] = "shared"
    """One token-wise gate per layer for all tasks (the reference), or one per task."""
    gate_task_bias: float = 0.0
    """A constant added to the task expert's gate logit: 0 starts every token near half shared, half
    task (the reference); 2 gives the task expert about 0.88 of each token at the start."""
    discriminator: Literal["linear", "mlp"] = "linear"
    """Per-layer task discriminator over the shared expert's pooled output."""
    discriminator_hidden: int = 256
    """Hidden width of the `mlp` discriminator."""
    adversarial_weight: float = 0.1
    """lambda: the gradient reversal scale (method moe_cl)."""
    discriminator_extra: Literal["none", "noise", "memory"] = "none"
    """What the discriminators see besides the current task's batch (moe_cl). none: nothing, as the paper;
    a stage then shows them one class only. noise: ACL's fake class, as many samples of N(0, 1) in the
    pooled shared-output space as real rows, labelled "not a task". memory: the pooled
    shared output of a few stored training rows of earlier tasks, labelled with their own task."""
    memory_rows: int = 16
    """discriminator_extra=memory: training rows kept per task (their token ids, in each stage folder's
    memory.safetensors; never trained on with the task loss)."""
    memory_batch: int = 2
    """discriminator_extra=memory: rows of one earlier task run with each micro-batch (an extra forward
    and backward of those rows, for the discriminator loss only)."""
    orthogonal_weight: float = 0.5
    """olora: weight of sum |A_t A_s^T| over earlier tasks s (O-LoRA's lambda_1)."""
    mocl_scale: float = 8.0
    """mocl: the experts' weights are softmax(mocl_scale x cos(query, task key)) over the learned tasks."""
    mocl_match_weight: float = 1.0
    """mocl: weight of the matching loss mean(1 - cos(query, key of the stage's task))."""


@dataclass
class TaskSource:
    """One task read from your own files through a `datasets` loader (trainer/sources.py). Name the columns
    of one row kind: text + label (classification), instruction + output (+ input), or messages (chat)."""

    train: str = ""
    """A .json / .jsonl / .csv / .parquet file or a save_to_disk folder; relative to data.root."""
    test: Optional[str] = None
    """The test split's file; null: a DatasetDict's test split, else carved out of train (test_fraction)."""
    format: Literal["auto", "json", "csv", "parquet", "disk"] = "auto"
    """auto: from the file extension (a folder: save_to_disk)."""
    text: Optional[str] = None
    """Classification: the column with the text to classify."""
    label: Optional[str] = None
    """Classification: the label column, strings or integers indexing `labels`."""
    labels: Optional[list[str]] = None
    """Label names in order (needed for integer labels; default: a ClassLabel's names, else the sorted strings)."""
    instruction: Optional[str] = None
    """Instruction rows: the instruction column."""
    input: Optional[str] = None
    """Instruction rows: an optional input column, shown after the instruction."""
    output: Optional[str] = None
    """Instruction rows: the answer column (evaluated by exact match)."""
    messages: Optional[str] = None
    """Chat rows: a column of [{role: user, content}, {role: assistant, content}] lists."""
    test_fraction: float = 0.1
    """Share of train carved out as the test split when there is no test file (seeded by the task name)."""


@dataclass
class DataConfig:
    root: str = "data/mtl5"
    """Folder holding one sub-folder per task (CL_Benchmark JSON or instruction JSONL)."""
    order: list[str] = field(default_factory=list)
    """The task order: one stage per task, in this order."""
    answer: Literal["letter", "label"] = "letter"
    """Classification target: the option's letter, or the label text itself."""
    options: bool = True
    """List the labels as options in a classification prompt. false: the instruction and the text only,
    answered by the label text (needs answer=label); more of the text fits in max_length."""
    max_length: int = 256
    """Tokens per example; long texts are cut inside the text, never in the options or answer."""
    val_fraction: float = 0.1
    """Share of each task's train split held out (seeded) as its validation split."""
    max_train_examples: Optional[int] = None
    """Cap on train rows per task (a seeded, class-balanced subset); null keeps all."""
    max_eval_examples: Optional[int] = None
    """Cap on test (and validation) rows per task, the same rows after every stage; null keeps all."""
    system_prompt: Optional[str] = None
    """System message for chat templates; null keeps the template's default (SmolLM2 adds one)."""
    instructions: dict[str, str] = field(default_factory=dict)
    """Per-task instruction text, overriding the built-in ones for MTL5 tasks."""
    tasks: dict[str, TaskSource] = field(default_factory=dict)
    """Tasks read from your own files with a column mapping (JSON, JSONL, CSV, Parquet, save_to_disk), by
    task name; the other tasks of the order are folders under data.root (docs/data.md)."""
    cache_dir: str = "~/.cache/moe-cl/datasets"
    """Where tokenized datasets are cached (by content hash of data, tokenizer and template)."""


@dataclass
class TrainConfig:
    lr: float = 2e-4
    """Peak learning rate of the new task's expert, the gates and the discriminator."""
    weight_decay: float = 0.0
    """AdamW weight decay of the trained parameters."""
    epochs: int = 1
    """Passes over the task's train rows per stage (unless max_steps is set)."""
    max_steps: Optional[int] = None
    """Optimizer steps per stage; overrides `epochs` when set."""
    micro_batch_size: int = 4
    """Rows per forward and backward pass on each rank."""
    global_batch_size: Optional[int] = None
    """Rows per optimizer step over all ranks. When set, the optimizer steps, the schedule and the result do
    not change with the cluster: accumulation = global_batch_size / (micro_batch_size x ranks), which must be
    a whole number. Null: micro_batch_size x grad_accum x ranks, which grows with the ranks."""
    grad_accum: int = 1
    """Micro-batches per rank per optimizer step, used only when global_batch_size is null."""
    min_steps: int = 20
    """A stage with fewer optimizer steps than this warns (and records the warning): the learning-rate
    schedule and checkpoint_every then hardly apply. Raise global batch or epochs, or lower this."""
    warmup_ratio: float = 0.06
    """Share of a stage's optimizer steps with a linear learning-rate warmup."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup, restarted at every stage."""
    min_lr_ratio: float = 0.0
    """The decay ends at lr * min_lr_ratio."""
    shared_expert_lr_scale: float = 1.0
    """Learning-rate multiplier of the shared expert (1 = the reference). The shared expert is
    retrained on every task; a lower rate keeps more of what earlier tasks' gates mix in."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    log_every: int = 10
    """Optimizer steps between TensorBoard points (and progress lines when the output is not a terminal)."""
    checkpoint_every: int = 0
    """Optimizer steps between mid-stage checkpoints (RUN_DIR/checkpoints/); 0 = none."""
    resume: Literal["auto", "never"] = "auto"
    """auto: an interrupted stage continues from its last mid-stage checkpoint."""
    activation_checkpointing: bool = False
    """Keep only each decoder layer's input during the training forward and recompute the layer in
    backward: less activation memory for ~one more forward per step. Same results (dropout included)."""

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step on `world_size` ranks."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass:
            fits = [m for m in range(1, self.micro_batch_size) if self.global_batch_size % (m * world_size) == 0]
            hint = (f"set train.micro_batch_size to {fits[-1]}" if fits else
                    f"make train.global_batch_size a multiple of {world_size} ranks")
            raise ConfigError(f"train.global_batch_size: {self.global_batch_size} rows per optimizer step cannot be "
                              f"split over {world_size} rank(s) x train.micro_batch_size {self.micro_batch_size} = "
                              f"{per_pass} rows per pass; {hint} (or run on fewer ranks)")
        return self.global_batch_size // per_pass

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch_size * self.accumulation(world_size) * world_size


@dataclass
class EvalConfig:
    batch_size: int = 16
    """Rows per evaluation forward (per rank)."""
    option_pairs: int = 32
    """At most this many (row, option) pairs per forward when options are scored by their likelihood
    (data.answer: label, or options that are not single distinct tokens). Each pair holds a copy of its
    prompt's key/value cache (at 7B, 2 x 32 layers x 4096 x 2 bytes = 0.5 MB per prompt token), so this
    bounds evaluation memory whatever the number of options: more options run in groups."""
    max_new_tokens: int = 32
    """Greedy decoding budget for generative (JSONL) tasks."""
    other_rows: Optional[int] = None
    """Test rows for the accuracy-matrix entries ACC and BWT do not read: only a stage's own task and,
    after the last stage, every task are evaluated on all their test rows (data.max_eval_examples);
    the untrained model and the other tasks of a stage on the first other_rows of them. null: all."""
    val: bool = True
    """Evaluate the stage's task on its validation split after training: printed and recorded in stage.json
    (eval.val_accuracy), never used to select anything."""
    task_id: Literal["given", "inferred"] = "given"
    """given: every test row is evaluated with its own task's prompt and experts. inferred: also as a
    deployment without task ids would serve it, the router choosing the task from the row's text (its
    prompt and experts); metrics.json then adds `routing_accuracy` and `inferred` beside the given-id figures."""


@dataclass
class RouterConfig:
    """The task router (trainer/router.py): per-task statistics of the frozen base's features of a
    request's own text, learned stage by stage from each task's training rows; no raw data is kept."""

    layer: int = 4
    """Decoder layers of the frozen base run for a request's routing features (0: its token embeddings
    alone). Larger than the base's depth: all of them. Chosen on MTL5's validation split
    (docs/benchmarks/routing.md)."""
    max_rows: int = 1000
    """Training rows per task the statistics are computed from (a seeded subset; the router does not
    depend on data.max_train_examples, which caps the rows trained on)."""
    shrinkage: float = 0.1
    """The shared covariance is shrunk this far towards its mean variance (times the identity)."""
    min_confidence: float = 0.001
    """A request is flagged (`routed_confidence` below this) when it lies farther from its routed task
    than that share of the task's training rows; with the default, farther than every one of them."""
    fallback: Literal["base", "routed"] = "base"
    """What `predict` does with a flagged request: base = the untouched base model answers its text
    (greedy, as a chat turn), routed = the routed task's experts and prompt serve it anyway."""


@dataclass
class DistributedConfig:
    strategy: Literal["auto", "local", "deepspeed"] = "auto"
    """auto: DeepSpeed when started by a launcher (torchrun, deepspeed, srun: WORLD_SIZE is set),
    else one plain PyTorch process. deepspeed: DeepSpeed even in a single process."""
    ds_config: str = "ds_configs/zero3.json"
    """The ZeRO choices (stage, offload, buckets): a DeepSpeed JSON file, or auto: at stage start the
    memory and communication plan (`python -m trainer plan`) picks, of zero2, zero3, zero3_hpz and
    zero3_offload in ds_configs/, the one with the least communication that fits each rank's memory, and
    stage.json records the plan and the choice. Batch sizes, accumulation, clipping and precision are
    filled in from this experiment config."""
    gloo_broadcast_gather: bool = False
    """CPU ranks (gloo): run DeepSpeed's parameter all-gathers as one broadcast per rank, faster than gloo's
    all-gather for large shards (measured: docs/distributed.md). Off by default: with it on, a rank aborted at
    exit ("terminate called without an active exception") in 2 of 3 full test runs (issue 30)."""
    param_persistence_threshold: Optional[int] = None
    """Overrides stage3_param_persistence_threshold (parameters below it are not sharded); 0 shards all."""
    timeout_seconds: int = 1800
    """Process-group timeout: a collective that waits longer for a rank (hung, or gone without its
    connection closing) fails, so the whole job ends instead of waiting forever. Must exceed the longest
    gap between collectives: one training step, or saving a checkpoint."""


@dataclass
class SlurmConfig:
    """How `python -m trainer submit` asks SLURM for each stage job (one job per stage, chained)."""

    nodes: int = 1
    """Nodes per stage job (sbatch --nodes)."""
    gpus_per_node: int = 0
    """Ranks per node = GPUs per node, asked of sbatch as --gpus-per-node; 0 asks for none and runs
    `procs_per_node` ranks per node instead."""
    procs_per_node: int = 1
    """Ranks per node when gpus_per_node is 0: CPU ranks, or one per GPU when the job gets its GPUs another way
    (e.g. "--gres=gpu:8" in slurm.extra)."""
    partition: Optional[str] = None
    """sbatch --partition; null: the cluster's default."""
    account: Optional[str] = None
    """sbatch --account; null: your default account."""
    time: str = "04:00:00"
    """Walltime per stage job (HH:MM:SS or D-HH:MM:SS)."""
    signal_seconds: int = 300
    """USR1 this long before the walltime: the trainer checkpoints and the job requeues itself.
    Must cover one training step plus writing a checkpoint."""
    cpus_per_task: Optional[int] = None
    """sbatch --cpus-per-task (one task per node runs all its ranks); also passed to srun."""
    mem: Optional[str] = None
    """sbatch --mem per node, e.g. "480G"; null: the partition's default."""
    job_name: str = "moecl"
    """Job name prefix; each stage job is named <job_name>-<stage>-<task>."""
    extra: list[str] = field(default_factory=list)
    """Further sbatch options, e.g. ["--qos=high", "--constraint=a100"]."""
    setup: list[str] = field(default_factory=list)
    """Shell lines the batch script sources before it starts the ranks, e.g. ["module load cuda/12.1",
    "export NCCL_DEBUG=WARN"]. They run in the batch shell on the job's first node only; what they export
    reaches every node's ranks through srun's environment, other effects do not. They do not choose the
    Python the ranks run: slurm.python does."""
    python: Optional[str] = None
    """The Python every node runs (an absolute path the nodes see, e.g. a venv on a shared filesystem); null:
    the one running `submit` (slurm/submit.sh runs this checkout's .venv if there is one)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment file, apply `a.b=value` overrides, type-check and validate."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = read_utf8(Path(path))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as e:  # a folder, no permission, ...
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
            what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
            if isinstance(e, yaml.reader.ReaderError):  # a forbidden character, at a character position
                line = text.count("\n", 0, e.position) + 1
                at, what = f"line {line}: ", str(e).splitlines()[0]
            raise ConfigError(f"{path}: {at}not valid YAML ({what or e})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML (lists or mappings nested too deeply)") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"{path}: not valid YAML ({str(e).split(';')[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run, model, ...)")
    errors: list[str] = []
    for item in overrides:
        _apply_override(raw, item, errors)
    cfg = _build(Config, raw, "", errors)
    bad_fields = {e.split(":")[0] for e in errors}  # fields left at defaults: skip their cross-checks
    errors.extend(e for e in validate(cfg) if e.split(":")[0] not in bad_fields)
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors))
    return cfg


def validate(cfg: Config) -> list[str]:
    """Cross-field checks; each message says what to change."""
    errs = []
    if not cfg.model.path:
        errs.append("model.path: required (a local Hugging Face folder or builtin:<name>)")
    if not cfg.data.order:
        errs.append("data.order: required, the list of task names to learn in turn")
    seen = set()
    for name in cfg.data.order:
        if not TASK_NAME.fullmatch(name):
            errs.append(f"data.order: task name {name!r} may only use letters, digits, '_' and '-'")
        if name in seen:
            errs.append(f"data.order: task {name!r} is listed twice; each task is one stage")
        seen.add(name)
    if name_clash := ({"shared"} & seen):
        errs.append(f"data.order: {sorted(name_clash)} is reserved for the shared expert; rename the task")
    for k, v in {"slurm.nodes": cfg.slurm.nodes, "slurm.procs_per_node": cfg.slurm.procs_per_node,
                 "slurm.signal_seconds": cfg.slurm.signal_seconds,
                 "run.lock_stale_seconds": cfg.run.lock_stale_seconds,
                 "distributed.timeout_seconds": cfg.distributed.timeout_seconds}.items():
        if v <= 0:
            errs.append(f"{k}: must be > 0, got {v}")
    if cfg.slurm.gpus_per_node < 0:
        errs.append(f"slurm.gpus_per_node: must be >= 0, got {cfg.slurm.gpus_per_node}")
    if not re.match(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$", cfg.slurm.time):
        errs.append(f"slurm.time: {cfg.slurm.time!r} is not HH:MM:SS or D-HH:MM:SS")
    if cfg.train.global_batch_size is not None:
        if cfg.train.global_batch_size <= 0:
            errs.append(f"train.global_batch_size: must be > 0 or null, got {cfg.train.global_batch_size}")
        elif cfg.train.grad_accum != 1:
            errs.append("train.grad_accum: leave it out when train.global_batch_size is set; the accumulation is "
                        "derived from the global batch and the number of ranks")
        elif cfg.train.global_batch_size % cfg.train.micro_batch_size:
            errs.append(f"train.global_batch_size: {cfg.train.global_batch_size} is not a multiple of "
                        f"train.micro_batch_size {cfg.train.micro_batch_size}")
    if cfg.train.min_steps < 0:
        errs.append(f"train.min_steps: must be >= 0 (0 never warns), got {cfg.train.min_steps}")
    if cfg.train.checkpoint_every < 0:
        errs.append("train.checkpoint_every: must be >= 0 (0 = no mid-stage checkpoints)")
    positive = {"experts.rank": cfg.experts.rank, "data.max_length": cfg.data.max_length,
                "train.micro_batch_size": cfg.train.micro_batch_size, "train.grad_accum": cfg.train.grad_accum,
                "train.epochs": cfg.train.epochs, "eval.batch_size": cfg.eval.batch_size,
                "eval.option_pairs": cfg.eval.option_pairs,
                "train.log_every": cfg.train.log_every, "train.lr": cfg.train.lr}
    errs += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if v <= 0]
    for k, v in {"train.max_steps": cfg.train.max_steps, "data.max_train_examples": cfg.data.max_train_examples,
                 "data.max_eval_examples": cfg.data.max_eval_examples}.items():
        if v is not None and v <= 0:
            errs.append(f"{k}: must be > 0 or null, got {v}")
    if cfg.eval.other_rows is not None and cfg.eval.other_rows <= 0:
        errs.append(f"eval.other_rows: must be > 0 or null, got {cfg.eval.other_rows}")
    if cfg.eval.other_rows is not None and cfg.eval.task_id == "inferred":
        errs.append("eval.other_rows: with eval.task_id=inferred every entry is evaluated on all test rows; "
                    "set eval.other_rows to null")
    if not cfg.data.options and cfg.data.answer != "label":
        errs.append("data.options: false lists no options, so there are no letters to answer with; set data.answer=label")
    if cfg.router.layer < 0:
        errs.append(f"router.layer: must be >= 0 (0 = token embeddings only), got {cfg.router.layer}")
    if cfg.router.max_rows < 2:
        errs.append(f"router.max_rows: must be >= 2 (a mean and a spread per task), got {cfg.router.max_rows}")
    if not 0 < cfg.router.shrinkage <= 1:
        errs.append(f"router.shrinkage: must be in (0, 1], got {cfg.router.shrinkage}")
    if not 0 <= cfg.router.min_confidence < 1:
        errs.append(f"router.min_confidence: must be in [0, 1), got {cfg.router.min_confidence}")
    if cfg.train.shared_expert_lr_scale < 0:
        errs.append("train.shared_expert_lr_scale: must be >= 0 (0 freezes the shared expert's updates)")
    for k, v in {"experts.dropout": cfg.experts.dropout, "train.warmup_ratio": cfg.train.warmup_ratio,
                 "train.min_lr_ratio": cfg.train.min_lr_ratio}.items():
        if not 0 <= v <= 1:
            errs.append(f"{k}: must be in [0, 1], got {v}")
    if not 0 < cfg.data.val_fraction < 1:
        errs.append(f"data.val_fraction: must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.experts.memory_rows < 1 or cfg.experts.memory_batch < 1:
        errs.append(f"experts.memory_rows / memory_batch: must be >= 1, got {cfg.experts.memory_rows} / "
                    f"{cfg.experts.memory_batch}")
    if cfg.experts.discriminator_extra == "noise" and "noise" in cfg.data.order:
        errs.append("experts.discriminator_extra: noise names the discriminators' extra class 'noise', which is "
                    "also a task of data.order; rename that task")
    if cfg.experts.discriminator_extra != "none" and cfg.experts.method != "moe_cl":
        errs.append(f"experts.discriminator_extra: {cfg.experts.discriminator_extra} needs the discriminators of "
                    f"method moe_cl, not {cfg.experts.method}; set it to none")
    if cfg.experts.adversarial_weight < 0:
        errs.append("experts.adversarial_weight: must be >= 0 (0 turns the adversarial term off)")
    if cfg.train.max_grad_norm < 0:
        errs.append("train.max_grad_norm: must be >= 0 (0 disables clipping)")
    unknown = sorted(set(cfg.data.instructions) - seen)
    if unknown:
        errs.append(f"data.instructions: {unknown} not in data.order {cfg.data.order}")
    for name, src in cfg.data.tasks.items():
        where = f"data.tasks.{name}"
        if not src.train:
            errs.append(f"{where}.train: required, the file or save_to_disk folder of the task's rows")
        kinds = [k for k, cols in {"text + label": (src.text, src.label), "instruction + output": (src.instruction,
                 src.output), "messages": (src.messages,)}.items() if any(cols)]
        if len(kinds) != 1:
            errs.append(f"{where}: name the columns of one row kind, text + label (classification), instruction + "
                        f"output (+ input) or messages (chat); got {kinds or 'none'}")
        elif kinds[0] == "text + label" and not (src.text and src.label):
            errs.append(f"{where}: a classification task needs both text and label columns")
        elif kinds[0] == "instruction + output" and not (src.instruction and src.output):
            errs.append(f"{where}: an instruction task needs both instruction and output columns")
        if src.input and not src.instruction:
            errs.append(f"{where}.input: only instruction tasks have an input column")
        if src.labels is not None and not src.text:
            errs.append(f"{where}.labels: only classification tasks (text + label) have labels")
        if src.labels is not None and (not src.labels or len(set(src.labels)) != len(src.labels)):
            errs.append(f"{where}.labels: must be a non-empty list of distinct label names")
        if not 0 < src.test_fraction < 1:
            errs.append(f"{where}.test_fraction: must be in (0, 1), got {src.test_fraction}")
    unknown = sorted(set(cfg.data.tasks) - seen)
    if unknown:
        errs.append(f"data.tasks: {unknown} not in data.order {cfg.data.order}")
    return errs


def reference() -> str:
    """Every field of the schema: `section.field: type = default`, then its docstring (`python -m trainer config`)."""
    import ast
    import inspect
    import textwrap

    lines = []

    def walk(cls, prefix: str) -> None:
        docs, tree = {}, ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(b.value.value.split())
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                own_doc = t.__doc__ and not t.__doc__.startswith(t.__name__ + "(")  # not the generated signature
                lines.append(f"\n{prefix}{f.name}:" + (f"  {' '.join(t.__doc__.split())}" if own_doc else ""))
                walk(t, f"{prefix}{f.name}.")
                continue
            item = typing.get_args(t)[1] if typing.get_origin(t) is dict else None
            kind = "a mapping of task names to sections" if dataclasses.is_dataclass(item) else _type_name(t)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {prefix}{f.name}: {kind} = {shown}")
            if f.name in docs:
                lines.extend(textwrap.wrap(docs[f.name], 100, initial_indent="      ", subsequent_indent="      "))
            if dataclasses.is_dataclass(item):
                lines.append(f"      each {prefix}{f.name}.<task> section:")
                walk(item, f"{prefix}{f.name}.<task>.")

    walk(Config, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Rebuild a config saved by `to_dict` (e.g. from a stage manifest)."""
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return cfg


def read_utf8(path: Path | str, error: type[Exception] = None) -> str:
    """A UTF-8 file's text (without a leading byte-order mark); other bytes raise `error` (ConfigError by
    default) naming the line and column. "-" reads standard input."""
    if str(path) == "-":
        import sys

        data, path = sys.stdin.buffer.read(), "standard input"
    else:
        data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = bom + e.start
        line, column = data.count(b"\n", 0, pos) + 1, pos - data.rfind(b"\n", 0, pos)
        raise (error or ConfigError)(f"{path}: line {line} column {column}: byte 0x{data[pos]:02x} is not UTF-8; "
                                     f"save the file as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {seen[key] + 1}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _apply_override(raw: dict, item: str, errors: list[str]) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        errors.append(f"override {item!r}: expected section.field=value, e.g. train.lr=1e-4")
        return
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            errors.append(f"override {item!r}: {p!r} is not a section")
            return
        node = child
    node[parts[-1]] = parsed


def _build(cls, raw: Any, prefix: str, errors: list[str]):
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{prefix}{key}: unknown key{hint}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        t = hints[f.name]
        item = typing.get_args(t)[1] if typing.get_origin(t) is dict else None
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _build(t, raw[f.name], f"{prefix}{f.name}.", errors)
        elif dataclasses.is_dataclass(item):  # a mapping of names to sections (data.tasks)
            if not isinstance(raw[f.name], dict):
                errors.append(f"{prefix}{f.name}: expected a mapping of names to sections, got {raw[f.name]!r}")
                continue
            kwargs[f.name] = {str(k): _build(item, v, f"{prefix}{f.name}.{k}.", errors) for k, v in raw[f.name].items()}
        else:
            ok, value = _coerce(raw[f.name], t)
            if ok:
                kwargs[f.name] = value
            else:
                errors.append(f"{prefix}{f.name}: expected {_type_name(t)}, got {raw[f.name]!r}")
    return cls(**kwargs)


def _coerce(value: Any, t) -> tuple[bool, Any]:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is not type(None):
                ok, v = _coerce(value, a)
                if ok:
                    return True, v
        return False, None
    if origin is Literal:
        return (value in args), value
    if origin is list:
        if isinstance(value, str):  # `data.order=agnews,yelp` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return False, None
        items = [_coerce(v, args[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        if not isinstance(value, dict):
            return False, None
        items = {str(k): _coerce(v, args[1]) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    if t is bool:
        return isinstance(value, bool), value
    if t is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if t is float:  # a str too: YAML 1.1 reads `1e-4` as one. Finite only: nan and inf are no setting
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return False, None
        try:
            value = float(value)
        except (ValueError, OverflowError):
            return False, None
        return math.isfinite(value), value
    if t is str:
        return isinstance(value, str), value
    return False, None


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(t, "__name__", str(t))
