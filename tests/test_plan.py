"""The memory and communication plan (trainer/plan.py): exact parameter counts, its arithmetic on the tiny
and 7B shapes, the layout it recommends, the activation model against a real training forward, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import run_cli
from trainer.config import ExpertsConfig, load_config
from trainer.plan import (GiB, LAYOUTS, OVERHEAD, Cluster, activation_bytes, count, make_plan, parse_size, plan_for,
                          read_ds_config)
from trainer.shapes import hf_config

ORDER = ["dbpedia", "amazon", "yahoo", "agnews"]


def _llama_base_params(h, i, layers, vocab, heads, kv):
    head_dim = h // heads
    attention = 2 * h * h + 2 * h * kv * head_dim
    return 2 * vocab * h + layers * (attention + 3 * h * i + 2 * h) + h


def _moe_cl_adapters(h, i, layers, rank, tasks, classes):
    expert = layers * 3 * rank * (h + i)  # LoRA A and B on gate, up (h -> i) and down (i -> h)
    gates = layers * 2 * h  # one token-wise gate [shared, task] per layer (experts.gate: shared)
    discriminators = layers * (h * classes + classes)  # linear, with bias
    return expert * (tasks + 1) + gates + discriminators, expert * 2 + gates + discriminators


@pytest.mark.parametrize("shape, dims", [("tiny", (64, 128, 2, 32000, 4, 2)),
                                         ("llama2-7b", (4096, 11008, 32, 32000, 32, 32)),
                                         ("mistral-7b", (4096, 14336, 32, 32000, 32, 8))])
def test_counts_are_exact(shape, dims):
    experts = ExpertsConfig(rank=8)
    s = count(hf_config(shape), experts, ORDER)
    h, i, layers, vocab, heads, kv = dims
    assert s.base_params == _llama_base_params(h, i, layers, vocab, heads, kv)
    held, trained = _moe_cl_adapters(h, i, layers, 8, len(ORDER), len(ORDER))
    assert (s.adapter_params, s.trained_params) == (held, trained)
    assert s.largest_adapter_tensor == max(8 * i, h * len(ORDER))
    if shape == "llama2-7b":
        assert s.base_params == 6_738_415_616  # Llama-2-7b-hf's published count
        assert s.largest_module == vocab * h  # the embedding / output matrix
    head_dim = h // heads
    assert s.layer_params == 2 * h * h + 2 * h * kv * head_dim + 3 * h * i + 2 * h


def test_every_adapter_tensor_of_the_7_8b_bases_stays_whole_under_the_shipped_zero3_configs():
    """stage3_param_persistence_threshold above the largest LoRA matrix of the supported 7-8B bases (MLP 14336:
    Mistral-7B and Llama-3-8B; 18944: Qwen2-7B), below every base matrix, so only the base is sharded."""
    largest_lora = 8 * 18944
    for layout in ("zero3", "zero3_hpz", "zero3_offload", "zero3_lowmem"):
        zero = read_ds_config(f"ds_configs/{layout}.json")["zero_optimization"]
        assert largest_lora <= zero["stage3_param_persistence_threshold"] < 512 * 3584, layout  # Qwen2-7B's k_proj
        # DeepSpeed's default (on): with it off, autograd keeps every gathered weight until backward (more memory)
        # while backward gathers each again all the same (docs/distributed.md)
        assert zero.get("memory_efficient_linear", True) is True, layout
    for layout in LAYOUTS:
        assert read_ds_config(LAYOUTS[layout])["communication_data_type"] == "fp32"


def _plan_7b(nodes, gpus, memory, **kw):
    cfg = load_config("configs/mtl5_7b.yaml", [f"train.{k}={v}" for k, v in kw.items()])
    return plan_for(cfg, Cluster(nodes, gpus, memory), hf_config("llama2-7b"), 2)


def test_7b_on_two_nodes_of_eight_80gb_gpus_replicates_the_base_with_zero2():
    plan = _plan_7b(2, 8, parse_size("80GiB"))
    assert plan.choice == "zero2"
    P, w = 6_738_415_616, 16
    z2, z3, hpz = plan.option("zero2"), plan.option("zero3"), plan.option("zero3_hpz")
    assert z2.memory["base"] == 2 * P and z3.memory["base"] == 2 * P // w
    assert hpz.memory["base_secondary"] == 2 * P // 8
    # ZeRO-3 gathers the base in forward and in backward of each micro-step (accumulation 1 on 16 GPUs)
    assert plan.accumulation == 1
    assert z3.sent["base_forward"] == z3.sent["base_backward"] == int(2 * P * 15 / 16)
    # ZeRO-2 moves only the trained adapters: fp32 gradients reduce-scattered, bf16 values gathered
    trained = plan.shape.trained_params
    assert z2.sent == {"gradients": int(4 * trained * 15 / 16), "adapter_gather": int(2 * trained * 15 / 16)}
    assert z2.communication * 100 < z3.communication
    # hpZ keeps the backward gather inside the node
    assert hpz.across_nodes == z3.across_nodes - z3.sent["base_backward"]
    for o in plan.options:
        assert o.total == sum(o.memory.values())
        assert o.memory["overhead"] == OVERHEAD["cuda"]


def test_layouts_that_do_not_fit_are_not_recommended():
    # 24 GB cards: a replicated 13.5 GB base plus 1024-token activations does not fit; ZeRO-3 does
    plan = _plan_7b(1, 8, parse_size("24GiB"))
    assert not plan.option("zero2").fits and plan.option("zero3").fits
    assert plan.choice == "zero3"
    # ... and with activation checkpointing the replicated base fits again
    assert _plan_7b(1, 8, parse_size("24GiB"), activation_checkpointing="true").choice == "zero2"
    assert "zero3_hpz" not in [o.layout for o in plan.options]  # one node: hpZ is plain ZeRO-3
    # nothing fits: no choice, and the CLI says what to change
    assert _plan_7b(1, 1, parse_size("8GiB")).choice is None


def test_70b_across_nodes_prefers_hpz_over_plain_zero3():
    cfg = load_config("configs/mtl5_7b.yaml", ["train.activation_checkpointing=true", "train.micro_batch_size=1"])
    plan = plan_for(cfg, Cluster(4, 8, parse_size("80GiB")), hf_config("llama2-70b"), 2)
    assert not plan.option("zero2").fits
    assert plan.choice == "zero3_hpz"


def test_activation_model_matches_what_autograd_saves_in_a_training_forward():
    """The plan's per-layer activation bytes against the tensors a real MoE-CL training forward saves for
    backward (counted by storage, parameters excluded), layer by layer: the difference between a 2- and a
    1-layer base of the same width, within 15%."""
    from transformers import LlamaConfig, AutoModelForCausalLM

    from trainer.model import MoECLModel

    def saved_bytes(layers, hidden, intermediate, tokens, dtype, dropout):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=500), dtype=dtype)
        model = MoECLModel(base, ["a", "b"], ExpertsConfig(rank=8, dropout=dropout))
        model.add_task("a")
        model.freeze_all_but("a")
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        ids = torch.randint(0, 500, (1, tokens))
        labels = torch.full_like(ids, -100)
        labels[:, -3:] = ids[:, -3:]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, torch.ones_like(ids), labels, "a")
        return sum(seen.values())

    for dtype, dropout, (hidden, intermediate) in [(torch.bfloat16, 0.05, (384, 1024)), (torch.float32, 0.0, (192, 512))]:
        measured = saved_bytes(2, hidden, intermediate, 96, dtype, dropout) - saved_bytes(1, hidden, intermediate, 96,
                                                                                          dtype, dropout)
        modelled = activation_bytes(hidden, intermediate, 1, 96, dtype.itemsize, dropout > 0, False)["activations"]
        assert abs(modelled - measured) <= 0.15 * measured, (dtype, modelled, measured)


def test_plan_cli_recommends_zero2_for_the_7b_config_on_two_nodes_of_eight():
    out = run_cli("plan", "configs/mtl5_7b.yaml", "--shape", "llama2-7b", "--nodes", "2", "--gpus-per-node", "8",
                  "--gpu-memory", "80GiB").stdout
    assert "recommended: zero2 (ds_configs/zero2.json)" in out
    plan = json.loads(run_cli("plan", "configs/mtl5_7b.yaml", "--shape", "llama2-7b", "--json").stdout)
    assert plan["choice"] == "zero2" and plan["cluster"] == {"nodes": 2, "gpus_per_node": 8,
                                                             "gpu_memory": 80 * GiB, "device": "cuda"}


def test_plan_cli_without_the_model_folder_says_to_give_a_shape(tmp_path):
    proc = run_cli("plan", "configs/mtl5_7b.yaml", f"model.path={tmp_path / 'missing'}", check=False)
    assert proc.returncode == 2
    assert "model.path" in proc.stderr and "--shape" in proc.stderr


@pytest.mark.parametrize("text, value", [("80GiB", 80 * GiB), ("24G", 24 * GiB), ("40GB", 40 * 10**9),
                                         ("512MiB", 512 << 20), ("1000", 1000)])
def test_sizes_parse(text, value):
    assert parse_size(text) == value


def test_sizes_that_do_not_parse_are_refused():
    with pytest.raises(ValueError, match="80 gigs"):
        parse_size("80 gigs")


def test_tiny_shape_plan_arithmetic():
    """Every term of a small plan, by hand: the tiny base on one CPU host with 2 ranks."""
    experts = ExpertsConfig(rank=4)
    s = count(hf_config("tiny"), experts, ["agnews", "yelp"])
    zero = {"zero2": {"reduce_bucket_size": 100, "allgather_bucket_size": 10},
            "zero3": {"reduce_bucket_size": 100, "stage3_max_live_parameters": 1000, "stage3_prefetch_bucket_size": 10}}
    plan = make_plan(s, Cluster(1, 2, GiB, "cpu"), 4, 96, 2, False, True, zero)
    z2, z3 = plan.option("zero2"), plan.option("zero3")
    P, A, At = s.base_params, s.adapter_params, s.trained_params
    acts = activation_bytes(64, 128, 2, 96, 4, True, False)
    assert z2.memory == {"base": 4 * P, "adapters": 4 * A + 4 * At, "optimizer": 16 * At // 2, "buffers": 4 * 100 + 4 * 10,
                         **acts, "overhead": OVERHEAD["cpu"]}
    gathered = 4 * min(P, max(s.largest_module, 1000)) + 4 * 10
    assert z3.memory == {"base": 4 * P // 2, "adapters": 4 * A, "optimizer": 16 * At // 2,
                         "buffers": 2 * 4 * 100 + gathered, **acts, "overhead": OVERHEAD["cpu"]}
    assert z3.sent == {"base_forward": int(4 * P / 2) * 2, "base_backward": int(4 * P / 2) * 2,
                       "gradients": int(4 * At / 2) * 2, "adapter_gather": int(4 * At / 2)}
    assert plan.choice == "zero2"  # both fit 1 GiB; ZeRO-2 moves far less
