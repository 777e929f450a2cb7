"""Command line: `python -m trainer <verb> ...`, or `moecl <verb> ...` once installed (`pip install .`).

    config [CONFIG [key=value ...] [--check]]  every config field (type, default, meaning), or the resolved config;
                                               --check also reads model.path and every task of data.order
    sequence CONFIG [key=value ...]            every stage of data.order, skipping complete ones
    stage CONFIG --stage K [key=value ...]     one stage, from stage K-1's output (one SLURM job)
    evaluate CONFIG [--stage K] [key=value]    accuracy of stage K's experts (0 = untrained) per task
    plan CONFIG [key=value] [--nodes N --gpus-per-node G --gpu-memory 80GiB --shape S]
                                               memory and communication per GPU of each ZeRO layout; the one to use
    submit CONFIG [key=value] [--dry-run]      one chained SLURM job per incomplete stage, after the checks of
                                               config --check; prints job ids (--dry-run: the sbatch commands)
    report RUN_DIR                             accuracy matrix, ACC / BWT / FWT of a run
    extract SOURCE --expert E --out DIR        one expert as a PEFT LoRA adapter
    merge SOURCE (--expert E | --task T) --out DIR    experts folded into a plain HF model
    export SOURCE --out DIR [--tasks a,b]      a serving bundle (experts + task router)
    predict --bundle DIR --input X.jsonl|-     answers; requests without "task" are routed
    inspect SOURCE [--json]                    tasks, experts, shapes, metrics, hashes
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .atomic import DiskFull
from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import DataError
from .distributed import EXIT_REQUEUE, Interrupted
from .runlock import LockError
from .slurm import SubmitError

USER_ERRORS = (ConfigError, DataError, CheckpointError, LockError, DiskFull, SubmitError, FileNotFoundError,
               ModuleNotFoundError)
ADAPTER_VERBS = ("extract", "merge", "export", "predict", "inspect")
DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None):
    """--dtype's torch dtype (None: the tools' default, the dtype the base was trained in)."""
    import torch

    return getattr(torch, name) if name else None


def build_parser() -> argparse.ArgumentParser:
    prog = "moecl" if os.path.basename(sys.argv[0]) == "moecl" else "python -m trainer"
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=f"Every config field, its type, default and "
                                f"meaning: {prog} config. The resolved config of a file: {prog} config FILE [key=value ...].",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, helptext in (("sequence", "train every stage of the order"), ("stage", "train one stage"),
                           ("evaluate", "evaluate a stage's output on every task")):
        sp = sub.add_parser(verb, help=helptext)
        sp.add_argument("config", help="experiment YAML (see configs/)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 data.order=[a,b]")
        if verb == "stage":
            sp.add_argument("--stage", type=int, required=True, help="1-based stage index in data.order")
        if verb == "evaluate":
            sp.add_argument("--stage", type=int, default=None, help="stage whose experts to load (default: last complete; 0: untrained)")
            sp.add_argument("--split", choices=("test", "val"), default="test", help="which split to evaluate")
            sp.add_argument("--json", action="store_true", help="print a JSON object instead of a line per task")
    sp = sub.add_parser("config", help="list every config field, or print the resolved config of a file + overrides")
    sp.add_argument("config", nargs="?", help="experiment YAML; without it, the reference of every field is printed")
    sp.add_argument("overrides", nargs="*", help="dotted overrides applied to the file, e.g. train.lr=1e-4")
    sp.add_argument("--check", action="store_true", help="also read model.path (config.json, weight files, "
                    "tokenizer) and load every task of data.order, as submit does before queueing anything")
    sp = sub.add_parser("plan", help="memory and communication per GPU of each ZeRO layout, and the one to use")
    sp.add_argument("config", help="experiment YAML")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    sp.add_argument("--nodes", type=int, help="nodes (default: slurm.nodes)")
    sp.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: slurm.gpus_per_node)")
    sp.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 40GB, 24G (default 80GiB)")
    sp.add_argument("--shape", help="a named base shape instead of model.path's config.json (before downloading it): "
                                    "llama2-7b, llama2-13b, llama2-70b, mistral-7b, tiny")
    sp.add_argument("--margin", type=float, default=0.1, help="share of each GPU's memory kept free (default 0.1)")
    sp.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="GPUs, or CPU ranks (host memory)")
    sp.add_argument("--json", action="store_true", help="print the plan as a JSON object")
    sp = sub.add_parser("submit", help="submit every incomplete stage to SLURM, one chained job per stage")
    sp.add_argument("config", help="experiment YAML; its slurm section sets nodes, GPUs, partition, walltime")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. slurm.nodes=2 slurm.account=PROJ")
    sp.add_argument("--dry-run", action="store_true", help="print the sbatch commands instead of running them")
    sp.add_argument("--no-check", action="store_true", help="skip reading model.path and the data on this host "
                    "(for paths only the compute nodes see)")
    sp = sub.add_parser("report", help="print and write a run's accuracy matrix and metrics")
    sp.add_argument("run_dir", help="the run folder (run.dir), holding stages/")
    src = "a run folder, stage folder, mid-stage checkpoint folder or bundle"
    sp = sub.add_parser("extract", help="one expert as a PEFT LoRA adapter folder")
    sp.add_argument("source", help=src)
    sp.add_argument("--expert", required=True, help="'shared' or a learned task's name")
    sp.add_argument("--out", required=True, help="folder to write the PEFT adapter to")
    sp.add_argument("--base", help="base model folder (default: the one the run used, checked by fingerprint)")
    sp = sub.add_parser("merge", help="fold experts into the base: a plain Hugging Face model folder")
    sp.add_argument("source", help=src)
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--expert", help="fold this one expert in (exact)")
    which.add_argument("--task", help="fold the shared + this task's experts in at their mean gate (approximate)")
    sp.add_argument("--out", required=True, help="folder to write the merged Hugging Face model to")
    sp.add_argument("--base", help="base model folder (default: the one the run used, checked by fingerprint)")
    sp.add_argument("--calibration-rows", type=int, default=64, help="training rows for the mean gate (--task)")
    sp.add_argument("--dtype", choices=DTYPES, help="the base's dtype for --task's measurements (default: the one "
                    "it was trained in; the merged weights keep the base's stored dtype)")
    sp = sub.add_parser("export", help="a self-contained serving bundle for some or all tasks")
    sp.add_argument("source", help=src)
    sp.add_argument("--out", required=True, help="folder to write the bundle to")
    sp.add_argument("--tasks", help="comma-separated task names (default: every learned task)")
    sp.add_argument("--base", help="base model folder (default: the one the run used, checked by fingerprint)")
    sp = sub.add_parser("predict", help="serve a bundle on a JSONL file of requests")
    sp.add_argument("--bundle", required=True, help="a bundle folder written by export")
    sp.add_argument("--input", required=True,
                    help='JSONL file, or - for standard input: {"task"?, "sentence" | "text"} or {"task"?, "instruction", '
                         '"input"?}; a request without "task" is routed to a learned task by the bundle\'s router')
    sp.add_argument("--output", help="JSONL with a 'prediction' per request (default: print)")
    sp.add_argument("--base", help="base model folder (default: the one the bundle names, checked by fingerprint)")
    sp.add_argument("--batch-size", type=int, default=16, help="requests per forward")
    sp.add_argument("--max-new-tokens", type=int, default=32, help="greedy budget of generated answers")
    sp.add_argument("--fallback", choices=("base", "routed"),
                    help="who serves a routed request of low confidence (default: the bundle's router.fallback)")
    sp.add_argument("--dtype", choices=DTYPES, help="the base's dtype (default: the one it was trained in)")
    sp = sub.add_parser("inspect", help="what a run, stage, checkpoint or bundle holds")
    sp.add_argument("source", help=src)
    sp.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher inserts --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    parser = build_parser()
    # Overrides may also follow the options (`stage CONFIG --stage 2 train.lr=1e-4`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    from . import runlock
    from .distributed import make_strategy

    try:
        if args.verb == "report":  # rewrites metrics.json unless a run holds the folder (then it only prints)
            from . import recipe

            strategy = make_strategy(None)
            try:
                with runlock.hold(args.run_dir, strategy):
                    return 0 if recipe.report(args.run_dir, None, strategy) is not None else 1
            except LockError:
                print(f"note: a run is writing {args.run_dir}; printing its metrics without rewriting metrics.json",
                      file=sys.stderr)
                return 0 if recipe.report(args.run_dir, None, strategy, write=False) is not None else 1
        if args.verb in ADAPTER_VERBS:
            return adapter_verb(args, make_strategy(None))
        if args.verb == "config":
            return config_verb(args, parser)
        cfg = load_config(args.config, args.overrides)
        if args.verb == "plan":
            return plan_verb(args, cfg)
        if args.verb == "submit":
            from .slurm import submit

            for line in submit(cfg, dry_run=args.dry_run, check=not args.no_check):
                print(line, flush=True)
            return 0
        from . import recipe  # (transformers' model code: seconds to import, not needed above)

        if args.verb in ("sequence", "stage"):
            from .data import load_tasks

            load_tasks(cfg.data, cfg.run.seed)  # bad data is reported before anything is written
        strategy = make_strategy(cfg, training=args.verb != "evaluate")
        if args.verb == "evaluate":  # writes nothing: no run lock
            result = recipe.evaluate_stage(cfg, args.stage, args.split, strategy)
            if args.json:
                strategy.print(json.dumps(result))
        else:
            with runlock.hold(cfg.run.dir, strategy, cfg.run.lock_stale_seconds):
                if args.verb == "sequence":
                    recipe.run_sequence(cfg, strategy)
                else:
                    recipe.run_stage(cfg, args.stage, strategy)
        strategy.close()
        return 0
    except Interrupted as e:  # every rank stops at the same step (stop_requested is a collective)
        strategy.print(str(e))
        strategy.close()
        return EXIT_REQUEUE
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def config_verb(args, parser) -> int:
    """`config`: the schema's reference, or a file's resolved config; with --check, the pre-flight checks too."""
    from .config import dump_yaml, reference

    if args.config is None:
        if args.check:
            parser.error("config --check needs a CONFIG file")
        print(reference(), end="")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(cfg), end="", flush=True)
    if args.check:
        from .preflight import check

        for line in check(cfg):
            print(f"checked {line}", file=sys.stderr)
        print("no problem found", file=sys.stderr)
    return 0


def plan_verb(args, cfg) -> int:
    """`plan`: the memory and communication model of trainer/plan.py, printed; no GPU, no weights needed."""
    from .config import ConfigError
    from .plan import Cluster, format_plan, parse_size, plan_for

    nodes = args.nodes or cfg.slurm.nodes
    gpus = args.gpus_per_node or cfg.slurm.gpus_per_node or cfg.slurm.procs_per_node
    try:
        memory = parse_size(args.gpu_memory)
    except ValueError as e:
        raise ConfigError(f"--gpu-memory: {e}") from None
    if args.shape:
        from .shapes import hf_config

        try:
            hf = hf_config(args.shape)
            hf.name_or_path = args.shape
        except KeyError as e:
            raise ConfigError(f"--shape: {e.args[0]}") from None
    else:
        from transformers import AutoConfig

        from .builtin import resolve_model_path

        try:
            folder = resolve_model_path(cfg.model)
        except FileNotFoundError as e:
            raise ConfigError(f"{e}; or give the base's shape with --shape (e.g. --shape llama2-7b)") from None
        hf = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    from .distributed import resolve_dtype

    import torch

    # model.dtype auto is bfloat16 on the GPUs planned for; elsewhere what this process resolves
    auto_on_gpu = cfg.model.dtype == "auto" and args.device == "cuda"
    dtype_bytes = 2 if auto_on_gpu else torch.empty((), dtype=resolve_dtype(cfg.model)).element_size()
    plan = plan_for(cfg, Cluster(nodes, gpus, memory, args.device), hf, dtype_bytes, margin=args.margin)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def adapter_verb(args, strategy) -> int:
    """extract / merge / export / predict / inspect (trainer/adapters.py): one process, no DeepSpeed; a
    model is placed on `strategy.device`, as is every batch."""
    from pathlib import Path

    from . import adapters

    if args.verb == "inspect":
        result = adapters.inspect(Path(args.source))
        print(json.dumps(result, indent=2, default=list) if args.json else adapters.format_inspect(result))
        return 0
    if args.verb == "predict":
        rows = adapters.predict(Path(args.bundle), Path(args.input), Path(args.output) if args.output else None,
                                strategy, args.base, args.batch_size, args.max_new_tokens, args.fallback,
                                _dtype(args.dtype))
        if not args.output:
            for r in rows:
                print(json.dumps(r))
        else:
            print(f"{len(rows)} predictions written to {args.output}")
        return 0
    ad = adapters.open_adapters(Path(args.source))
    if args.verb == "extract":
        out = adapters.extract_peft(ad, args.expert, Path(args.out), args.base)
        print(f"PEFT adapter for expert {args.expert!r} written to {out}")
    elif args.verb == "merge":
        report = adapters.merge(ad, Path(args.out), args.expert, args.task, strategy, args.base, args.calibration_rows,
                                dtype=_dtype(args.dtype))
        print(json.dumps({k: v for k, v in report.items() if k not in ("files", "gate_means")}, indent=2))
        print(f"merged model written to {args.out}")
    else:
        tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
        info = adapters.export_bundle(ad, Path(args.out), tasks, args.base)
        print(f"bundle for {[t['name'] for t in info['tasks']]} written to {args.out}")
    return 0


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are the output; silence library bars and deprecation chatter."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # DeepSpeed calls torch.distributed APIs that warn on every call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
