"""trainer/perf.py: FLOPs per token on a 7B shape against hand arithmetic, the GPU peak table, peak memory
resets, the time split and MFU."""

from __future__ import annotations

import pytest
import torch

from trainer import perf
from trainer.config import ConfigError, ExpertsConfig
from trainer.model import MoECLModel
from trainer.plan import count
from trainer.shapes import hf_config


def _meta_model(method: str, gate: str = "per_task") -> MoECLModel:
    """Llama-2-7B-shaped MoE-CL model on the meta device at stage 2 of [a, b] (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    experts = ExpertsConfig(method=method, rank=8, alpha=16, gate=gate)
    with torch.device("meta"):
        model = MoECLModel(AutoModelForCausalLM.from_config(hf_config("llama2-7b")), ["a", "b"], experts)
        for t in ("a", "b"):
            model.add_task(t)
        model.freeze_all_but("b")
    return model


def test_flops_per_token_of_moe_cl_on_the_7b_shape_by_hand():
    params = perf.token_params(_meta_model("moe_cl"), "b")
    h, i, layers, r = 4096, 11008, 32, 8
    base = layers * (4 * h * h + 3 * h * i)  # q, k, v, o (32 kv heads: all h x h) and gate, up, down
    assert base == 6_476_005_376
    adapters = layers * (2 * 3 * r * (h + i) + 2 * h)  # shared + b's expert (LoRA on gate, up, down), b's gate
    assert adapters == 23_461_888
    assert params == {"base": base, "adapters_trained": adapters, "adapters_frozen": 0}  # a's expert does not run
    # plan.count's exact counts agree: a decoder layer less its two RMSNorm weights
    shape = count(hf_config("llama2-7b"), ExpertsConfig(rank=8, alpha=16, gate="per_task"), ["a", "b"])
    assert base == shape.layers * (shape.layer_params - 2 * h)
    flops = perf.flops_per_token(**params, recompute=False)
    assert flops == {"base_forward": 12_952_010_752, "base_backward_input_gradients": 12_952_010_752,
                     "adapters": 140_771_328, "recomputation": 0, "total": 26_044_792_832}
    with_recompute = perf.flops_per_token(**params, recompute=True)
    assert with_recompute["recomputation"] == 2 * (base + adapters) == 12_998_934_528
    assert with_recompute["total"] == 39_043_727_360


def test_frozen_adapters_that_run_cost_forward_and_input_gradients():
    """O-LoRA at stage 2 sums a's frozen LoRA with b's trained one: 6 x trained + 4 x frozen."""
    params = perf.token_params(_meta_model("olora", gate="shared"), "b")
    expert = 32 * 3 * 8 * (4096 + 11008)
    assert params["adapters_trained"] == params["adapters_frozen"] == expert == 11_599_872
    assert perf.flops_per_token(**params, recompute=False)["adapters"] == 10 * expert


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12), ("NVIDIA A100 80GB PCIe", torch.bfloat16, 312e12),
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12), ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989e12), ("NVIDIA L40S", torch.bfloat16, 362e12),
    ("NVIDIA L4", torch.bfloat16, 121e12), ("NVIDIA A10", torch.bfloat16, 125e12),
    ("Tesla V100-SXM2-32GB", torch.float16, 125e12),
    ("Tesla V100-SXM2-32GB", torch.bfloat16, None), ("NVIDIA H100 NVL", torch.bfloat16, None),
    ("NVIDIA A10G", torch.bfloat16, None), ("NVIDIA A100-SXM4-80GB", torch.float32, None)])
def test_gpu_peak_table(name, dtype, peak):
    value, why = perf.gpu_peak_flops(name, dtype)
    assert value == peak
    assert name in why and (peak is not None or perf.PEAK_ENV in why)


def test_cpu_has_no_peak_unless_given(monkeypatch):
    value, why = perf.peak_flops(torch.device("cpu"), torch.float32)
    assert value is None and perf.PEAK_ENV in why
    assert perf.peak_flops(torch.device("cpu"), torch.float32, 2.5)[0] == 2.5e12
    monkeypatch.setenv(perf.PEAK_ENV, "0.5")
    assert perf.peak_override() == 0.5
    for bad in ("fast", "-3", "0"):
        monkeypatch.setenv(perf.PEAK_ENV, bad)
        with pytest.raises(ConfigError, match=perf.PEAK_ENV):
            perf.peak_override()


def test_mfu_is_achieved_over_the_ranks_peak():
    params = {"base": 1000, "adapters_trained": 10, "adapters_frozen": 0}
    out = perf.stage_performance(params, False, tokens=2000, seconds=4.0, world_size=2, device=torch.device("cpu"),
                                 dtype=torch.float32, memory_per_rank={}, override_tflops=1e-6)
    assert out["flops_per_token"]["total"] == 4060 and out["tokens_per_s"] == 500
    assert out["achieved_flops_per_s"] == 4060 * 500
    assert out["mfu"] == pytest.approx(4060 * 500 / (2 * 1e6)) and out["mfu_reason"] is None
    none = perf.stage_performance(params, False, 2000, 4.0, 1, torch.device("cpu"), torch.float32, {}, None)
    assert none["mfu"] is None and perf.PEAK_ENV in none["mfu_reason"]


def test_peak_memory_of_each_phase_is_its_own():
    peaks = perf.PeakMemory(torch.device("cpu"))
    big = torch.ones(64 << 20, dtype=torch.uint8) + 1  # 64 MiB touched
    peaks.mark("big")
    del big
    peaks.mark("small")
    assert peaks.reset  # Linux: /proc/self/clear_refs
    assert peaks.phases["big"]["rss"] >= peaks.phases["small"]["rss"] + (48 << 20)
    assert peaks.stage() == {"rss": peaks.phases["big"]["rss"]}
    gathered = perf.memory_per_rank(peaks, lambda v: [v, v / 2])  # two ranks
    assert gathered["stage"]["rss"] == [peaks.phases["big"]["rss"], peaks.phases["big"]["rss"] // 2]


def test_time_split_and_its_line():
    split = perf.time_split({"setup": 10, "baseline_evaluation": 5, "training": 60, "router": 2, "evaluation": 13,
                             "save": 1}, wall=100)
    assert split["seconds"]["other"] == 9 and split["evaluation_seconds"] == 20
    assert split["evaluation_share"] == 0.2 and sum(split["share"].values()) == pytest.approx(1)
    line = perf.format_time_split(3, split)
    assert line.startswith("stage 3 took 100.0 s: setup 10.0 s (10%)") and line.endswith("evaluation's share 20%")
