"""Real DeepSpeed ZeRO-3 on CPU with 2 gloo ranks: sharding, equivalence with one rank, kill and
resume, zero_to_fp32, and both launchers (torchrun and deepspeed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from safetensors.torch import load_file

from trainer.checkpoint import sha256_file

from .conftest import REPO, run_cli

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def torchrun(nproc: int, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trainer", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _overrides(tmp_path, model_cache, run="run", **extra) -> list[str]:
    o = {"run.dir": str(tmp_path / run), "model.cache_dir": str(model_cache), "data.cache_dir": str(tmp_path / "cache"),
         "data.max_train_examples": 32, "data.max_eval_examples": 12, "distributed.param_persistence_threshold": 0,
         "experts.dropout": 0.0, "train.micro_batch_size": 4, "train.log_every": 1}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (as a node failure would). Killing the
    launcher's process group is not enough: torchrun's workers may sit in groups of their own and,
    orphaned, would finish the stage and delete the checkpoint the resumed run needs."""
    parents: dict[int, int] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    parents[int(stat)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier and c not in tree]
        tree.update(children)
        frontier = children
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _adapters(tmp_path, run, stage="1-agnews"):
    return load_file(tmp_path / run / "stages" / stage / "adapters.safetensors")


def _manifest(tmp_path, run, stage="1-agnews"):
    return json.loads((tmp_path / run / "stages" / stage / "stage.json").read_text())


def test_frozen_base_is_really_sharded_across_two_ranks():
    proc = subprocess.run([sys.executable, "tools/bench_memory.py", "configs/tiny.yaml", "--ranks", "2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = figures["base_bytes"]["1"], figures["base_bytes"]["2"]
    assert one > 10_000_000  # the tiny base: ~12.9 MB of fp32
    for share in two:
        assert 0.49 < share / one < 0.51  # each rank holds half of the frozen base
    assert 0.45 < figures["optimizer_bytes"]["ratio"] < 0.55  # and half of the optimizer state


def test_two_ranks_match_one_rank_with_twice_the_accumulation(tmp_path, model_cache):
    """One train.global_batch_size of 8 rows (micro 4): 2 ranks derive accumulation 1 (ZeRO-3), 1 rank
    accumulation 2 (ZeRO-3 and plain PyTorch); the same global batches, so the same adapters.
    The task router's statistics, reduced over the 2 ranks, equal those of one rank, and so do the
    accuracies with inferred task ids (the next task's rows are all served under the learned one).
    The same stage under zero3_offload.json (parameters and optimizer state in CPU memory, torch's fused
    AdamW: no DeepSpeed op is compiled) trains like ZeRO-3, and in float16 (DeepSpeed's loss
    scaling; fp32 masters) within float16's error of float32. (One test: the shared reference runs are the
    cost.)"""
    inferred = {"eval.task_id": "inferred", "router.layer": 1}  # 1 of 2 layers: the truncated pass under ZeRO-3
    batch = {"train.global_batch_size": 8}
    torchrun(2, "stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "two", **batch, **inferred),
             "--stage", "1")
    run_cli("stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "one", **batch, **{
        "distributed.strategy": "deepspeed"}, **inferred), "--stage", "1")
    run_cli("stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "local", **batch, **{
        "distributed.strategy": "local"}, **inferred), "--stage", "1")
    plain = {"eval.val": False, "data.max_eval_examples": 4}  # only the adapters are compared
    torchrun(2, "stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "off", **batch, **plain, **{
        "distributed.ds_config": "ds_configs/zero3_offload.json"}), "--stage", "1")
    # DeepSpeed runs float16 on a CPU only with oneDNN float16 (AVX512-FP16 / AMX-FP16: recent Xeons, not AMD
    # EPYC); elsewhere the trainer refuses it before loading anything, naming the setting.
    fp16 = bool(get_accelerator().is_fp16_supported())
    proc = run_cli("stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "half", **batch, **plain, **{
        "distributed.strategy": "deepspeed", "model.dtype": "float16"}), "--stage", "1", check=fp16)
    if not fp16:
        assert proc.returncode != 0 and "model.dtype=float16: DeepSpeed does not run float16" in proc.stderr, proc.stderr
        assert not (tmp_path / "half" / "stages" / "1-agnews").exists()
    two, one, local = (_adapters(tmp_path, r) for r in ("two", "one", "local"))
    assert two.keys() == one.keys() == local.keys()
    for k in two:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
        # Plain PyTorch reduces gradients in another order; Adam magnifies that on near-zero
        # gradients (seen: up to 3e-4 on a gate weight of 0.13 after 4 steps).
        torch.testing.assert_close(two[k], local[k], rtol=0, atol=1e-3)
    assert any(torch.count_nonzero(two[k]) for k in two if k.endswith("lora_b"))
    off = _adapters(tmp_path, "off")
    assert off.keys() == two.keys()
    for k in two:
        torch.testing.assert_close(off[k], two[k], rtol=0, atol=1e-3)
    ext = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    assert not ext.exists() or not any(ext.iterdir())  # nothing JIT-built (DeepSpeed's CPU Adam: minutes)
    if not fp16:
        return
    half = _adapters(tmp_path, "half")
    assert half.keys() == two.keys()
    assert all(half[k].dtype == torch.float32 and torch.isfinite(half[k]).all() for k in half)
    # Typical entries agree to 1% of the tensor's scale, and each tensor as a whole to 10% of its norm. Not
    # every entry: Adam's normalised steps turn a near-zero gradient whose sign float16 rounding flips into
    # full steps the other way (seen: a lora_b entry at +0.002 against -0.002 after 4 steps, 4% of its norm).
    rel = {k: ((half[k] - one[k]).norm() / one[k].norm()).item() for k in two if one[k].norm() > 0}
    typical = {k: ((half[k] - one[k]).abs().median() / one[k].abs().max()).item() for k in rel}
    assert max(rel.values()) <= 0.10 and max(typical.values()) <= 0.01, (rel, typical)
    assert all(torch.count_nonzero(half[k]) for k in half if k.endswith("lora_b"))  # every B moved in float16
    mh = _manifest(tmp_path, "half")
    assert mh["config"]["model"]["dtype"] == "float16" and mh["train"]["overflow_skipped_steps"] < mh["train"]["steps"]
    m2, m1, ml = (_manifest(tmp_path, r) for r in ("two", "one", "local"))
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert [(m["train"]["global_batch"], m["train"]["accumulation"]) for m in (m2, m1, ml)] == [(8, 1), (8, 2), (8, 2)]
    assert m2["train"]["steps"] == m1["train"]["steps"] == ml["train"]["steps"]
    assert m2["eval"]["test_accuracy"] == m1["eval"]["test_accuracy"] == ml["eval"]["test_accuracy"]
    assert m2["baseline"] == m1["baseline"] == ml["baseline"]
    for key in ("routing_accuracy", "inferred_accuracy", "confusion"):
        assert m2["eval"][key] == m1["eval"][key] == ml["eval"][key], key
    assert set(m2["eval"]["inferred_accuracy"]) == {"agnews", "yelp"} and m2["eval"]["confusion"]["yelp"] == {"agnews": 12}
    routers = [load_file(tmp_path / r / "stages" / "1-agnews" / "router.safetensors") for r in ("two", "one", "local")]
    assert routers[0].keys() == routers[1].keys() == routers[2].keys()
    assert routers[0]["tasks.agnews.mean"].shape == (64,)
    assert (m2["router"]["layer"], m2["router"]["rows"]) == (1, {"agnews": 270})
    for k in routers[0]:
        for other in routers[1:]:
            # float32 features of differently padded batches: equal to ~1e-7 of each tensor's scale
            torch.testing.assert_close(routers[0][k], other[k], rtol=1e-5, atol=1e-6 * routers[0][k].abs().max().item())


def test_olora_penalty_under_zero3_matches_one_process(tmp_path, model_cache):
    """O-LoRA's penalty reads earlier tasks' A matrices; under ZeRO-3 (every parameter partitioned)
    a 2-rank stage 2 ends where the single-process run does."""
    o = {"experts.method": "olora", "experts.orthogonal_weight": 50.0, "train.lr": 0.01}
    torchrun(2, "sequence", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "two", **o))
    run_cli("sequence", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "local", **o, **{
        "distributed.strategy": "local"}))
    two, local = (_adapters(tmp_path, r, "2-yelp") for r in ("two", "local"))
    assert two.keys() == local.keys() and any(".experts.yelp." in k for k in two)
    for k in two:
        torch.testing.assert_close(two[k], local[k], rtol=0, atol=1e-3)
    # The penalty acts: without it, yelp's A matrices overlap agnews' more.
    run_cli("sequence", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "free", **{
        **o, "experts.orthogonal_weight": 0.0, "distributed.strategy": "local"}))
    free = _adapters(tmp_path, "free", "2-yelp")
    overlap = lambda sd: sum((sd[f"layers.{i}.experts.yelp.{p}.lora_a"] @  # noqa: E731
                              sd[f"layers.{i}.experts.agnews.{p}.lora_a"].T).abs().sum()
                             for i in range(2) for p in ("gate_proj", "up_proj", "down_proj"))
    assert overlap(local) < 0.9 * overlap(free)


def test_killed_two_rank_stage_resumes_to_the_uninterrupted_result(tmp_path, model_cache):
    base = _overrides(tmp_path, model_cache, "run", **{"train.max_steps": 12, "train.checkpoint_every": 2})
    torchrun(2, "stage", "configs/tiny.yaml", *base, "--stage", "1")
    stage1 = tmp_path / "run" / "stages" / "1-agnews"
    hashes = {p.name: sha256_file(p) for p in stage1.iterdir()}
    # Stage 2, killed (SIGKILL, the launcher and its workers) once a mid-stage checkpoint exists.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
           "stage", "configs/tiny.yaml", *base, "--stage", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = tmp_path / "run" / "checkpoints" / "2-yelp" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step-0000004"):
        assert proc.poll() is None and time.time() < deadline, "stage 2 ended before a checkpoint was written"
        time.sleep(0.2)
    _kill_tree(proc.pid)
    proc.wait(timeout=60)
    assert not (tmp_path / "run" / "stages" / "2-yelp").exists()
    assert {p.name: sha256_file(p) for p in stage1.iterdir()} == hashes

    # DeepSpeed's own zero_to_fp32 reads the mid-stage checkpoint: the trainable parameters, whole.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = latest.read_text().strip()
    state = get_fp32_state_dict_from_zero_checkpoint(str(latest.parent), tag, exclude_frozen_parameters=True)
    final_keys = _adapters(tmp_path, "run", "1-agnews").keys()
    assert len(state) > 0 and all(t.numel() > 0 for t in state.values())
    assert any(".experts.yelp." in k for k in state) and not any(".experts.agnews." in k for k in state)
    assert len(state) == len([k for k in final_keys if ".experts.agnews." not in k]) + 2 * 2 * 3
    # The trained adapters are written once (rank 0's model-states file), not once per rank; the resume
    # below restores rank 1's from its optimizer partition.
    module = {r: torch.load(latest.parent / tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)["module"] for r in (0, 1)}
    assert any(".experts.yelp." in k for k in module[0]) and len(module[1]) == 0

    resumed = torchrun(2, "stage", "configs/tiny.yaml", *base, "--stage", "2")
    assert "resuming" in resumed.stdout, resumed.stdout + resumed.stderr[-3000:]
    import shutil

    shutil.copytree(stage1, tmp_path / "clean" / "stages" / "1-agnews")  # the same stage 1, uninterrupted stage 2
    torchrun(2, "stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "clean", **{
        "train.max_steps": 12, "train.checkpoint_every": 2}), "--stage", "2")
    a, b = _adapters(tmp_path, "run", "2-yelp"), _adapters(tmp_path, "clean", "2-yelp")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert _manifest(tmp_path, "run", "2-yelp")["train"]["resumed_at"] >= 4
    assert {p.name: sha256_file(p) for p in stage1.iterdir()} == hashes
    assert not (tmp_path / "run" / "checkpoints" / "2-yelp").exists()  # removed once the stage is written


def test_adapter_file_round_trips_through_a_partitioned_model(tmp_path, model_cache):
    """Evaluate under 2 ZeRO-3 ranks loads stage 1 into a freshly partitioned model; accuracies match."""
    o = _overrides(tmp_path, model_cache, "run")
    torchrun(2, "sequence", "configs/tiny.yaml", *o)
    out = torchrun(2, "evaluate", "configs/tiny.yaml", *o, "--stage", "1", "--json")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == _manifest(tmp_path, "run")["eval"]["test_accuracy"]
    one, two = _adapters(tmp_path, "run"), _adapters(tmp_path, "run", "2-yelp")
    for k in one:
        if ".experts.agnews." in k:
            assert torch.equal(one[k], two[k])  # frozen under ZeRO-3 too: bit-identical
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["accuracy"]) == 2


def test_deepspeed_launcher_runs_a_sequence_with_a_discriminator_memory(tmp_path, model_cache):
    """The deepspeed launcher, 2 ranks, experts.discriminator_extra=memory: stage 2 runs stored agnews rows
    through the partitioned model (a second forward per micro-batch) and ends where one process does."""
    o = {"experts.discriminator_extra": "memory", "experts.memory_rows": 6, "experts.memory_batch": 2}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "trainer", "sequence",
           "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "ds", **o)]
    env = _env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    m2 = _manifest(tmp_path, "ds", "2-yelp")
    assert m2["world_size"] == 2 and set(m2["train"]["discriminator_accuracy"]) == {"agnews", "yelp"}
    assert set(_manifest(tmp_path, "ds", "1-agnews")["train"]["discriminator_accuracy"]) == {"agnews"}
    assert len(json.loads((tmp_path / "ds" / "metrics.json").read_text())["accuracy"]) == 2
    from trainer.memory import MEMORY, Memory

    memory = Memory.load(tmp_path / "ds" / "stages" / "2-yelp" / MEMORY, m2["files"][MEMORY])
    assert {t: len(r) for t, r in memory.rows.items()} == {"agnews": 6, "yelp": 6}
    run_cli("sequence", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "local", **o, **{
        "distributed.strategy": "local"}))
    ds, local = (_adapters(tmp_path, r, "2-yelp") for r in ("ds", "local"))
    assert ds.keys() == local.keys()
    for k in ds:
        torch.testing.assert_close(ds[k], local[k], rtol=0, atol=1e-3)


def test_ds_config_errors_are_clear(tmp_path, model_cache):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2, "offload_param": {}}}))
    proc = run_cli("stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache), f"distributed.ds_config={bad}",
                   "distributed.strategy=deepspeed", "--stage", "1", check=False)
    assert proc.returncode == 2
    assert "'train_batch_size' is 64 but the experiment config gives 8" in proc.stderr
    assert "offload_param needs stage 3" in proc.stderr


def test_float16_training_without_deepspeed_is_refused(tmp_path, model_cache):
    """No loss scaling without DeepSpeed: a float16 stage under the plain PyTorch strategy stops at once."""
    local = run_cli("stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "local", **{
        "model.dtype": "float16", "distributed.strategy": "local"}), "--stage", "1", check=False)
    assert local.returncode == 2 and "training in float16 needs DeepSpeed's dynamic loss scaling" in local.stderr
    assert not (tmp_path / "local").exists()


def test_zero2_bf16_restores_adapters_at_their_fp32_values(tmp_path, model_cache, tiny_llama_dir):
    """ZeRO-2 with bf16 casts every parameter to bf16 before building the fp32 masters; the restored
    adapters' fp32 values must still be what stage 2 starts from. Stage 2 runs at lr 1e-30 (an Adam step
    of ~1e-30 cannot move an fp32 value of these magnitudes), so what it saves is where it started."""
    o = {"distributed.ds_config": "ds_configs/zero2.json", "model.dtype": "bfloat16"}
    torchrun(2, "stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "run", **o), "--stage", "1")
    torchrun(2, "stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "run", **o, **{"train.lr": 1e-30}),
             "--stage", "2")
    one, two = _adapters(tmp_path, "run"), _adapters(tmp_path, "run", "2-yelp")
    restored_trainable = [k for k in one if ".experts.agnews." not in k]  # shared expert, gates, discriminators
    assert len(restored_trainable) == 18
    # Stage 1 saved fp32 master values that bf16 cannot hold (else this test could not tell).
    assert all(not torch.equal(one[k], one[k].bfloat16().float()) for k in restored_trainable)
    for k in one:
        assert torch.equal(two[k], one[k]), (k, (two[k] - one[k]).abs().max())


def test_activation_checkpointing_under_zero3_gives_the_same_adapters(tmp_path, model_cache, tiny_llama_dir):
    """train.activation_checkpointing with 2 ZeRO-3 ranks: stage 2 restores a frozen expert and trains
    the discriminators too; every adapter, loss and accuracy as without it."""
    o = {"train.global_batch_size": 16, "eval.val": False}  # accumulation 2 on 2 ranks
    torchrun(2, "sequence", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "plain", **o))
    torchrun(2, "sequence", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "ckpt", **o, **{
        "train.activation_checkpointing": True}))
    for stage in ("1-agnews", "2-yelp"):
        plain, ckpt = _adapters(tmp_path, "plain", stage), _adapters(tmp_path, "ckpt", stage)
        assert plain.keys() == ckpt.keys()
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-7)
        assert any(torch.count_nonzero(plain[k]) for k in plain if k.endswith("lora_b"))
        mp, mc = _manifest(tmp_path, "plain", stage), _manifest(tmp_path, "ckpt", stage)
        assert mc["eval"] == mp["eval"]
        for loss in ("first_logged_task_loss", "last_logged_task_loss"):
            assert mc["train"][loss] == pytest.approx(mp["train"][loss], rel=1e-6)


RECOMPUTE_PROBE = '''
import json, sys
from trainer import recipe
from trainer.config import load_config
from trainer.data import collate
from trainer.distributed import make_strategy

cfg = load_config("configs/tiny.yaml", sys.argv[2:])
strategy = make_strategy(cfg)
s = recipe.setup_stage(cfg, 1, strategy)
tr = recipe.prepare_training(s, strategy)
seen = []  # (layer, numel of its frozen base gate_proj weight when the layer's MLP runs)
for i, layer in enumerate(s.model.moe_layers):  # registered after DeepSpeed's gather hooks: run after them
    layer.base.gate_proj.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, m.weight.numel())))
s.model.train()
batch = collate([tr.train_set.rows[j] for j in range(cfg.train.micro_batch_size)], s.tokenizer.pad_token_id)
out = tr.engine(batch["input_ids"], batch["attention_mask"], batch["labels"], s.task)
forward = len(seen)
strategy.backward(out.loss)
with open(f"{sys.argv[1]}/rank{strategy.rank}.json", "w") as f:  # one file per rank: stdout lines interleave
    json.dump({"forward": seen[:forward], "backward": seen[forward:]}, f)
strategy.close()
'''


def test_activation_checkpointing_recomputes_layers_with_gathered_weights_under_zero3(tmp_path, model_cache,
                                                                                      tiny_llama_dir):
    """Each rank recomputes every decoder layer in backward (last first), and the recomputation sees the
    frozen base weights whole (gathered), not their shape-[0] partitions."""
    script = tmp_path / "probe.py"
    script.write_text(RECOMPUTE_PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), *_overrides(tmp_path, model_cache, "run", **{"train.activation_checkpointing": True})]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for r in (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)):
        assert r["forward"] == [[0, 128 * 64], [1, 128 * 64]]  # tiny-llama: intermediate 128, hidden 64
        assert r["backward"] == [[1, 128 * 64], [0, 128 * 64]]


def test_auto_ds_config_picks_by_the_plan_and_records_it(tmp_path, model_cache):
    """distributed.ds_config=auto: the tiny base fits every rank whole, so the plan picks ZeRO-2 (the least
    communication), the stage runs under it, and stage.json records the plan and the choice."""
    torchrun(2, "stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "run", **{
        "distributed.ds_config": "auto", "eval.val": False}), "--stage", "1")
    d = _manifest(tmp_path, "run")["distributed"]
    assert d["strategy"] == "deepspeed" and d["choice"] == "zero2" and d["zero_stage"] == 2
    assert d["ds_config"] == "ds_configs/zero2.json"
    plan = d["plan"]
    assert plan["cluster"]["nodes"] == 1 and plan["cluster"]["gpus_per_node"] == 2 and plan["cluster"]["device"] == "cpu"
    layouts = {o["layout"]: o for o in plan["options"]}
    assert set(layouts) == {"zero2", "zero3", "zero3_offload"}  # one node: no hpZ
    assert layouts["zero2"]["communication"] < layouts["zero3"]["communication"]
    assert d["planned_bytes_per_rank"] == layouts["zero2"]["total"]


GATHER_PROBE = r'''
import sys
import torch, torch.distributed as dist
import deepspeed
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
import deepspeed.comm.comm as ds_comm
from trainer.distributed import _all_gather_by_broadcasts

plain = ds_comm.cdb.all_gather_into_tensor
_all_gather_by_broadcasts()
assert ds_comm.cdb.all_gather_into_tensor is not plain
rank = dist.get_rank()
sub = dist.new_group([0, 2])  # a subgroup whose members are not ranks 0..n-1 (as hpZ's node groups)
for group, members in ((None, [0, 1, 2]), (sub, [0, 2])):
    if rank not in members:
        continue
    for dtype, shape in ((torch.bfloat16, (5, 3)), (torch.float32, (7,))):
        x = torch.arange(torch.Size(shape).numel(), dtype=dtype).view(shape) + 100 * rank
        want, got = torch.empty((len(members) * shape[0],) + shape[1:], dtype=dtype), torch.empty(
            (len(members) * shape[0],) + shape[1:], dtype=dtype)
        plain(want, x, group=group, async_op=True).wait()
        ds_comm.all_gather_into_tensor(got, x, group=group, async_op=True).wait()
        assert torch.equal(got, want), (group, dtype, got, want)
        inplace = torch.empty_like(want)
        part = inplace.view(len(members), -1)[members.index(rank)]
        part.copy_(x.view(-1))
        ds_comm.all_gather_into_tensor(inplace, part, group=group)  # the input is this rank's part of the output
        assert torch.equal(inplace, want)
dist.barrier()
with open(f"{sys.argv[1]}/rank{rank}.ok", "w") as f:  # one file per rank: stdout lines interleave
    f.write("ok")
dist.destroy_process_group()
'''


def test_all_gather_by_broadcasts_equals_gloo_all_gather(tmp_path):
    """The trainer's gloo all-gather (one broadcast per rank) gives what torch's gives, on the world and on a
    subgroup, into a separate buffer or in place."""
    script = tmp_path / "probe.py"
    script.write_text(GATHER_PROBE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           str(script), str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok", "rank2.ok"]


def test_hpz_on_two_nodes_trains_as_plain_zero3(tmp_path, model_cache):
    """ds_configs/zero3_hpz.json on 2 nodes x 2 ranks (two torchrun launchers meeting by c10d rendezvous, as
    on two hosts): the secondary partition is the node's 2 ranks, and the stage trains as plain ZeRO-3 on 2
    ranks does with the same global batches (hpZ changes only where backward's gathers come from)."""
    o = {"train.global_batch_size": 8, "train.micro_batch_size": 2, "eval.val": False, "data.max_eval_examples": 4}
    port = _free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={n}", "--nproc_per_node=2",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=hpz-{port}", "-m", "trainer",
         "stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "hpz", **o, **{
             "distributed.ds_config": "ds_configs/zero3_hpz.json"}), "--stage", "1"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    torchrun(2, "stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, "plain", **o), "--stage", "1")
    m = _manifest(tmp_path, "hpz")
    assert m["world_size"] == 4 and m["distributed"]["zero_hpz_partition_size"] == 2
    assert (m["train"]["global_batch"], m["train"]["accumulation"]) == (8, 1)
    hpz, plain = _adapters(tmp_path, "hpz"), _adapters(tmp_path, "plain")
    assert hpz.keys() == plain.keys()
    for k in hpz:
        torch.testing.assert_close(hpz[k], plain[k], rtol=1e-4, atol=1e-5)
    assert any(torch.count_nonzero(hpz[k]) for k in hpz if k.endswith("lora_b"))


@pytest.mark.parametrize("local_rank, visible, gpu", [("3", 1, 0), ("3", 8, 3), ("5", 4, 1), (None, 2, 0)])
def test_a_rank_claims_a_gpu_it_can_see_and_deepspeed_reads_the_same(local_rank, visible, gpu):
    """srun --gpus-per-task=1 shows each rank one GPU (device 0) while LOCAL_RANK counts the node's ranks:
    the rank's GPU is LOCAL_RANK modulo the visible GPUs, and LOCAL_RANK is rewritten to it before
    DeepSpeed, which reads the variable itself, starts."""
    from trainer.distributed import claim_local_gpu

    env = {} if local_rank is None else {"LOCAL_RANK": local_rank}
    assert claim_local_gpu(env, visible) == gpu and env["LOCAL_RANK"] == str(gpu)
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        claim_local_gpu({"LOCAL_RANK": "0"}, 0)
