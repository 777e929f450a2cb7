"""The MoE-CL layer and model: exact mixture, gradient reversal, pooling, parameter declarations."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from trainer.config import ExpertsConfig
from trainer.model import MoECLModel, answer_positions, check_supported
from trainer.moe import SHARED, MoECLMLP, Routing, masked_mean, reverse_gradient


def _fill_experts(layer: MoECLMLP, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in layer.adapter_modules().values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _naive_expert(base, expert, x):
    """E_e(x) computed the direct way, with its own base down projection."""
    gate = base.gate_proj(x) + expert.gate_proj(x)
    up = base.up_proj(x) + expert.up_proj(x)
    h = base.act_fn(gate) * up
    return base.down_proj(h) + expert.down_proj(h)


@pytest.fixture()
def layer(tiny_base):
    mlp = tiny_base.model.layers[0].mlp
    routing = Routing()
    moe = MoECLMLP(mlp, 0, routing, hidden=64, intermediate=128, rank=4, alpha=8, dropout=0.0, gate_mode="shared")
    moe.add_task("a")
    _fill_experts(moe)
    return moe


def test_mixture_equals_naive_two_expert_formula(layer):
    x = torch.randn(3, 5, 64)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    for collect in (False, True):  # with and without the fused pooled-output path
        r = layer.routing
        r.task, r.mask, r.collect, r.pool = "a", mask, collect, collect
        y = layer(x)
        w = torch.softmax(layer.gates["all_tasks"].proj(x), dim=-1)
        naive = w[..., :1] * _naive_expert(layer.base, layer.experts[SHARED], x) + \
            w[..., 1:] * _naive_expert(layer.base, layer.experts["a"], x)
        torch.testing.assert_close(y, naive, rtol=1e-5, atol=1e-5)


def test_pooled_shared_output_is_masked_mean_of_shared_expert(layer):
    x = torch.randn(2, 6, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    r = layer.routing
    r.task, r.mask, r.collect, r.pool = "a", mask, True, True
    layer(x)
    e_s = _naive_expert(layer.base, layer.experts[SHARED], x)
    expected = torch.stack([e_s[0].mean(0), e_s[1, :2].mean(0)])
    torch.testing.assert_close(layer.routing.pooled[0], expected, rtol=1e-5, atol=1e-5)


def test_summed_experts_equal_lora_on_each_projection(layer):
    """The baselines' routing: one expert alone is that expert; several add their LoRA updates to
    each projection (O-LoRA at inference); none is the base MLP."""
    x = torch.randn(2, 4, 64)
    r = layer.routing
    r.task, r.mask, r.collect, r.pool = None, None, False, False
    r.summed = (SHARED,)
    torch.testing.assert_close(layer(x), _naive_expert(layer.base, layer.experts[SHARED], x), rtol=1e-5, atol=1e-5)
    r.summed = ()
    torch.testing.assert_close(layer(x), layer.base(x), rtol=1e-6, atol=1e-6)
    r.summed = (SHARED, "a")
    base, (s, a) = layer.base, (layer.experts[SHARED], layer.experts["a"])
    g = base.gate_proj(x) + s.gate_proj(x) + a.gate_proj(x)
    u = base.up_proj(x) + s.up_proj(x) + a.up_proj(x)
    h = base.act_fn(g) * u
    torch.testing.assert_close(layer(x), base.down_proj(h) + s.down_proj(h) + a.down_proj(h), rtol=1e-5, atol=1e-5)


def test_masked_mean_by_hand():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert masked_mean(x, mask).flatten().tolist() == [2.0, 4.0]


def test_gradient_reversal_sign_and_scale():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    (reverse_gradient(x, 0.3) * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * w)
    y = reverse_gradient(x, 0.3)
    torch.testing.assert_close(y, x)  # identity forward


def test_new_expert_starts_as_noop(tiny_base):
    x = torch.randint(0, 1000, (2, 6))
    mask = torch.ones_like(x)
    with torch.no_grad():
        base_logits = tiny_base(input_ids=x, attention_mask=mask).logits
    model = MoECLModel(tiny_base, ["a", "b"], ExpertsConfig(dropout=0.0))
    model.add_task("a")
    layer = model.moe_layers[0]
    h = torch.randn(2, 6, 64)
    torch.testing.assert_close(layer.experts["a"].down_proj(torch.randn(2, 6, 128)), torch.zeros(2, 6, 64))
    torch.testing.assert_close(layer.experts["a"].gate_proj(h), torch.zeros(2, 6, 128))
    with torch.no_grad():  # shared and task experts both zero: the base model exactly
        hidden = model.hidden_states(x, mask, "a")
        logits = model.base.get_output_embeddings()(hidden)
    torch.testing.assert_close(logits, base_logits, rtol=1e-5, atol=1e-5)


def _adversarial_grads(base_dir, lam: float):
    """Gradients of L_D alone w.r.t. a shared-expert weight and a discriminator weight."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = MoECLModel(base, ["a", "b"], ExpertsConfig(dropout=0.0, adversarial_weight=lam))
    model.add_task("a")
    _fill_experts(model.moe_layers[0], seed=3)
    _fill_experts(model.moe_layers[1], seed=4)
    model.freeze_all_but("a")
    x = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    model.hidden_states(x, torch.ones_like(x), "a", collect=True)
    model.discriminator_loss("a")[0].backward()
    return (model.moe_layers[0].experts[SHARED].down_proj.lora_b.grad.clone(),
            model.discriminators[0].net.weight.grad.clone())


def test_adversarial_gradient_reaches_upstream_reversed_and_scaled(tiny_llama_dir):
    """The discriminator descends L_D; the shared expert receives -lambda * dL_D."""
    g = {lam: _adversarial_grads(tiny_llama_dir, lam) for lam in (0.0, 0.5, 1.0, -1.0)}
    assert torch.count_nonzero(g[0.0][0]) == 0  # lambda = 0: no adversarial signal upstream
    assert g[1.0][0].abs().sum() > 0
    torch.testing.assert_close(g[1.0][0], 2 * g[0.5][0])
    # lambda = -1 is a plain (unreversed) path: the true dL_D, opposite in sign to what lambda = 1 gives.
    torch.testing.assert_close(g[-1.0][0], -g[1.0][0])
    torch.testing.assert_close(g[0.5][1], g[1.0][1])  # the discriminator's own gradient is not scaled


def test_trainable_parameters_are_declared_and_old_experts_frozen(tiny_base):
    model = MoECLModel(tiny_base, ["a", "b"], ExpertsConfig())
    model.add_task("a")
    model.add_task("b")
    params = model.freeze_all_but("b")
    ids = {id(p) for p in params}
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {n for n, p in named.items() if id(p) in ids}
    assert any(".experts.shared." in n for n in trainable) and any(".experts.b." in n for n in trainable)
    assert not any(".experts.a." in n for n in trainable)
    assert any(n.startswith("discriminators.") for n in trainable)
    assert not any(n.startswith("base.") and ".mlp.experts." not in n and ".mlp.gates." not in n for n in trainable)


def test_exact_saved_key_set(tiny_base):
    model = MoECLModel(tiny_base, ["a", "b"], ExpertsConfig(gate="per_task"))
    model.add_task("a")
    expected = set()
    for layer in range(2):
        for expert in ("shared", "a"):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                expected |= {f"layers.{layer}.experts.{expert}.{proj}.lora_a", f"layers.{layer}.experts.{expert}.{proj}.lora_b"}
        expected.add(f"layers.{layer}.gates.a.proj.weight")
        expected |= {f"discriminators.{layer}.net.weight", f"discriminators.{layer}.net.bias"}
    assert set(model.adapter_parameters()) == expected
    shapes = {k: tuple(p.shape) for k, p in model.adapter_parameters().items()}
    assert shapes["layers.0.experts.a.down_proj.lora_a"] == (8, 128)
    assert shapes["layers.1.experts.shared.gate_proj.lora_b"] == (128, 8)
    assert shapes["discriminators.0.net.weight"] == (2, 64)


def test_shared_gate_mode_has_one_gate(tiny_base):
    model = MoECLModel(tiny_base, ["a", "b"], ExpertsConfig(gate="shared", discriminator="mlp"))
    model.add_task("a")
    model.add_task("b")
    assert list(model.moe_layers[0].gates) == ["all_tasks"]
    assert model.moe_layers[0].gate_for("a") is model.moe_layers[0].gate_for("b")
    assert model.discriminators[0].net[0].weight.shape == (256, 64)


def test_step_cost_does_not_grow_with_learned_tasks(tiny_base):
    """Only the shared and the routed expert run: count expert calls with many tasks learned."""
    tasks = [f"t{i}" for i in range(6)]
    model = MoECLModel(tiny_base, tasks, ExpertsConfig())
    for t in tasks:
        model.add_task(t)
    calls = []
    for layer in model.moe_layers:
        for name, expert in layer.experts.items():
            expert.gate_proj.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x = torch.randint(0, 1000, (1, 4))
    model.hidden_states(x, torch.ones_like(x), "t3")
    assert sorted(set(calls)) == ["shared", "t3"] and len(calls) == 4  # 2 layers x 2 experts


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3"):
        check_supported(gpt2)


def test_training_forward_requires_the_task_expert(tiny_base):
    model = MoECLModel(tiny_base, ["a", "b"], ExpertsConfig())
    x = torch.randint(0, 1000, (1, 4))
    with pytest.raises(KeyError, match="add_task"):
        model(x, torch.ones_like(x), x, "a")


def test_discriminator_loss_is_plain_cross_entropy_on_logits(tiny_base):
    model = MoECLModel(tiny_base, ["a", "b", "c"], ExpertsConfig(dropout=0.0))
    model.add_task("b")
    x = torch.randint(0, 1000, (2, 5))
    model.hidden_states(x, torch.ones_like(x), "b", collect=True)
    loss, acc = model.discriminator_loss("b")
    logits = [d(model.routing.pooled[i]) for i, d in enumerate(model.discriminators)]
    expected = torch.stack([F.cross_entropy(z, torch.tensor([1, 1])) for z in logits]).mean()
    torch.testing.assert_close(loss, expected)
    assert set(acc) == {"b"}
    torch.testing.assert_close(acc["b"], torch.stack([(z.argmax(-1) == 1).float().mean() for z in logits]).mean())


@pytest.mark.parametrize("method, trained", [
    ("moe_cl", {"shared", "b", "gates", "discriminators"}),
    ("moe_cl_no_gan", {"shared", "b", "gates"}),
    ("seq_lora", {"shared"}),
    ("per_task_lora", {"b"}),
    ("olora", {"b"}),
    ("mocl", {"b", "keys"}),
])
def test_each_method_declares_what_it_trains(tiny_llama_dir, method, trained):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = MoECLModel(base, ["a", "b"], ExpertsConfig(method=method))
    model.add_task("a")
    model.add_task("b")
    params = {id(p) for p in model.freeze_all_but("b")}
    found = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if id(p) in params:
            found.add("discriminators" if parts[0] == "discriminators" else "keys" if parts[0] == "task_keys" else
                      "gates" if "gates" in parts else parts[parts.index("experts") + 1])
        else:
            assert not p.requires_grad, name
    assert found == trained
    assert model.learned_tasks == ["a", "b"]
    has_shared = method not in ("per_task_lora", "olora", "mocl")
    assert (SHARED in model.moe_layers[0].experts) == has_shared
    assert ("a" in model.moe_layers[0].experts) == (method != "seq_lora")


def test_olora_penalty_is_the_l1_of_a_products_and_reaches_only_the_new_expert(tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = MoECLModel(base, ["a", "b"], ExpertsConfig(method="olora", dropout=0.0))
    model.add_task("a")
    model.add_task("b")
    model.freeze_all_but("b")
    model.train()
    x = torch.randint(0, 1000, (1, 5))
    model(x, torch.ones_like(x), x, "b")
    loss = model.orthogonality_loss("b")
    expected = sum((getattr(layer.experts["b"], p).lora_a @ getattr(layer.experts["a"], p).lora_a.T).abs().sum()
                   for layer in model.moe_layers for p in ("gate_proj", "up_proj", "down_proj"))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.moe_layers[0].experts["b"].up_proj.lora_a.grad.abs().sum() > 0
    assert model.moe_layers[0].experts["a"].up_proj.lora_a.grad is None
    # Inference is task-id free: every learned LoRA at once, whichever task is asked for.
    with torch.no_grad():
        for task in ("a", "b", None):
            model._route(task, torch.ones_like(x), collect=False)
            assert model.routing.summed == ("a", "b")


def _step_with(base_dir, checkpointing: bool):
    """Stage 2 (task b, a's expert frozen) of a moe_cl model with dropout: loss, trainable gradients, and
    how many times each MoE-CL layer ran in one training forward + backward."""
    from trainer.model import checkpoint_layers

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = MoECLModel(base, ["a", "b"], ExpertsConfig(rank=4, alpha=8, dropout=0.1))
    for t in ("a", "b"):
        model.add_task(t)
    for i, layer in enumerate(model.moe_layers):
        _fill_experts(layer, seed=10 + i)
    params = model.freeze_all_but("b")
    if checkpointing:
        checkpoint_layers(model)
    calls = [0] * len(model.moe_layers)
    for i, layer in enumerate(model.moe_layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls[i] + 1))
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = torch.where(torch.arange(12) >= 9, ids, -100)
    torch.manual_seed(5)  # the dropout draws
    out = model(ids, mask, labels, "b")
    out.loss.backward()
    names = {id(p): k for k, p in model.adapter_parameters().items()}
    return out, {names[id(p)]: p.grad for p in params}, calls


def test_activation_checkpointing_recomputes_each_layer_with_the_same_gradients(tiny_llama_dir):
    """Dropout on: the recomputation replays the forward's masks, and the discriminators' pooled input (a
    side output of each layer) still carries the adversarial gradient to the shared expert and gates."""
    plain, plain_grads, plain_calls = _step_with(tiny_llama_dir, False)
    ckpt, ckpt_grads, ckpt_calls = _step_with(tiny_llama_dir, True)
    assert plain_calls == [1, 1] and ckpt_calls == [2, 2]  # each layer ran again in backward
    assert torch.equal(ckpt.loss, plain.loss) and torch.equal(ckpt.disc_loss, plain.disc_loss)
    assert ckpt_grads.keys() == plain_grads.keys()
    assert any(k.startswith("discriminators") for k in plain_grads) and any(".gates." in k for k in plain_grads)
    for k, grad in plain_grads.items():
        assert grad is not None and grad.abs().sum() > 0, k
        torch.testing.assert_close(ckpt_grads[k], grad, rtol=1e-6, atol=1e-8)


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_preserves_the_mean():
    """The CPU mask (16-bit NumPy draws seeded from torch's generator): keep rate within 5 binomial s.e. of
    1 - p, kept elements scaled by 1 / (1 - p), one mask shared by the tensors of a call, torch.manual_seed
    fixing it, and nothing dropped in eval mode."""
    from trainer.moe import dropout

    ones, twos = torch.ones(256, 1024), torch.full((256, 1024), 2.0)
    torch.manual_seed(3)
    a, b = dropout([ones, twos], 0.1, training=True)
    n, kept = a.numel(), (a != 0).float().mean().item()
    assert abs(kept - 0.9) < 5 * (0.9 * 0.1 / n) ** 0.5
    assert torch.allclose(a[a != 0], torch.tensor(1 / 0.9)) and torch.equal(b, 2 * a)
    assert abs(a.mean().item() - 1.0) < 5 * (0.1 / 0.9 / n) ** 0.5
    torch.manual_seed(3)
    assert torch.equal(dropout([ones], 0.1, training=True)[0], a)
    assert not torch.equal(dropout([ones], 0.1, training=True)[0], a)  # the next draw differs
    assert dropout([ones], 0.1, training=False)[0] is ones and dropout([ones], 0.0, training=True)[0] is ones


def _variant(base_dir, extra: str, seed: int = 0, lam: float = 0.1):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = MoECLModel(base, ["a", "b"], ExpertsConfig(dropout=0.0, discriminator_extra=extra, adversarial_weight=lam))
    for t in ("a", "b"):
        model.add_task(t)
    for i, layer in enumerate(model.moe_layers):
        _fill_experts(layer, seed=20 + i)
    return model


def test_noise_class_gives_each_stage_a_second_class_the_discriminator_learns(tiny_llama_dir):
    """discriminator_extra=noise: one more output ("noise"), as many N(0, 1) samples as real rows (ACL's
    fake class), accuracy reported per class; the noise reaches no parameter upstream (only the discriminators'
    gradients change), and a few discriminator steps learn to tell the two classes apart."""
    plain, noisy = _variant(tiny_llama_dir, "none"), _variant(tiny_llama_dir, "noise")
    assert noisy.classes == ["a", "b", "noise"] and noisy.discriminators[0].net.out_features == 3
    assert plain.discriminators[0].net.out_features == 2
    x = torch.randint(0, 1000, (6, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    grads = {}
    for name, model in (("none", plain), ("noise", noisy)):
        params = model.freeze_all_but("b")
        model.train()
        model.hidden_states(x, mask, "b", collect=True)
        loss, acc = model.discriminator_loss("b")
        assert set(acc) == ({"b", "noise"} if name == "noise" else {"b"})
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.adapter_parameters().items() if p.grad is not None}
        for p in params:
            p.grad = None
    # Upstream of the discriminators the noise adds nothing: the reversed gradient comes from the real rows,
    # whose cross-entropy is now over three classes (so it differs), and reaches what it reached before.
    up = [n for n, g in grads["none"].items() if not n.startswith("discriminators") and g.abs().sum() > 0]
    assert up and all(grads["noise"][n].abs().sum() > 0 for n in up)
    # The discriminators alone, trained on this batch against fresh noise each step, separate the classes.
    noisy.requires_grad_(False)
    disc = list(noisy.discriminators.parameters())
    for p in disc:
        p.requires_grad_(True)
    opt = torch.optim.Adam(disc, lr=1e-2)
    with torch.no_grad():
        noisy.hidden_states(x, mask, "b", collect=True)
    pooled = dict(noisy.routing.pooled)
    for _ in range(200):
        noisy.routing.pooled.update(pooled)
        loss, acc = noisy.discriminator_loss("b")
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Real rows sit in a small region the noise surrounds, so a linear discriminator cannot label all noise.
    z = torch.randn(2000, 64)
    with torch.no_grad():
        fresh = [(d(z).argmax(-1) == 2).float().mean().item() for d in noisy.discriminators]
    assert acc["b"] > 0.9 and min(fresh) > 0.6, (acc, fresh)


def test_memory_rows_feed_the_discriminators_and_never_the_task_loss(tiny_llama_dir):
    """A memory batch of task a during task b's stage: the task loss and its gate statistics are those of
    the task batch alone, the discriminators report accuracy on both classes, and the adversarial gradient
    the memory rows add reaches the shared expert."""
    x = torch.randint(0, 1000, (4, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    labels = torch.where(torch.arange(10) >= 8, x, -100)
    mem = (torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(3)), torch.ones(2, 7, dtype=torch.long), "a")
    outs, grads = {}, {}
    for with_memory in (False, True):
        model = _variant(tiny_llama_dir, "memory")
        model.freeze_all_but("b")
        model.train()
        out = model(x, mask, labels, "b", mem if with_memory else None)
        out.loss.backward()
        outs[with_memory] = out
        grads[with_memory] = model.moe_layers[0].experts[SHARED].gate_proj.lora_b.grad.clone()
        assert model.moe_layers[0].experts["a"].gate_proj.lora_b.grad is None  # a's expert stays frozen
    assert torch.equal(outs[True].task_loss, outs[False].task_loss) and outs[True].gate_shared == outs[False].gate_shared
    assert set(outs[False].disc_acc) == {"b"} and set(outs[True].disc_acc) == {"a", "b"}
    assert outs[True].disc_loss > outs[False].disc_loss
    assert not torch.allclose(grads[True], grads[False])


def test_memory_keeps_seeded_rows_per_task_and_round_trips(tmp_path):
    from trainer.memory import Memory

    rows = [{"input_ids": list(range(i, i + 3 + i % 4))} for i in range(40)]
    mem = Memory().with_task("a", rows, 16, seed=0).with_task("b", rows[:5], 16, seed=0)
    assert len(mem.rows["a"]) == 16 and len(mem.rows["b"]) == 5
    assert all(r in [x["input_ids"] for x in rows] for r in mem.rows["a"])
    assert mem.rows["a"] == Memory().with_task("a", rows, 16, seed=0).rows["a"]  # seeded
    assert mem.rows["a"] != Memory().with_task("a", rows, 16, seed=1).rows["a"]
    sha = mem.save(tmp_path / "memory.safetensors")
    assert Memory.load(tmp_path / "memory.safetensors", sha).rows == mem.rows
    assert mem.batch([], 0, 2, 0, pad_id=0) is None
    ids, m, task = mem.batch(["a", "b"], 1, 3, 0, pad_id=-1)
    assert task == "b" and ids.shape[0] == 3 and mem.batch(["a", "b"], 2, 3, 0, pad_id=-1)[2] == "a"
    for row, keep in zip(ids.tolist(), m.tolist()):
        assert [t for t, k in zip(row, keep) if k] in mem.rows["b"] and all(t == -1 for t, k in zip(row, keep) if not k)


def test_gate_task_bias_starts_the_gate_towards_the_task_expert():
    """experts.gate_task_bias adds a constant to the task logit: w_t = sigmoid(l_t + b - l_s)."""
    from trainer.moe import Gate

    torch.manual_seed(0)
    plain, biased = Gate(64), Gate(64, task_bias=2.0)
    biased.load_state_dict(plain.state_dict())  # the same weights: the bias is no parameter
    x = torch.randn(4, 16, 64)
    w0, w2 = plain(x), biased(x)
    logits = plain.proj(x)
    torch.testing.assert_close(w2[..., 1], torch.sigmoid(logits[..., 1] + 2.0 - logits[..., 0]))
    assert abs(w0[..., 1].mean().item() - 0.5) < 0.1 and w2[..., 1].mean().item() > 0.8


def test_memory_rows_get_the_same_reversal_sign_and_scale(tiny_llama_dir):
    """The memory rows' discriminator loss reaches the shared expert reversed and scaled by lambda, like the
    current task's: its gradient there is -lambda times the plain dL_D/dtheta (lambda = -1 is the plain path)."""
    ids = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)

    def grad(lam):
        model = _variant(tiny_llama_dir, "memory", lam=lam)
        model.freeze_all_but("b")
        model.train()
        model.hidden_states(ids, mask, "a", collect=True)  # task a's rows as a memory batch
        model.discriminator_loss("a")[0].backward()
        return model.moe_layers[0].experts[SHARED].down_proj.lora_b.grad.clone()

    g = {lam: grad(lam) for lam in (0.5, 1.0, -1.0)}
    assert g[1.0].abs().sum() > 0
    torch.testing.assert_close(g[1.0], 2 * g[0.5])
    torch.testing.assert_close(g[-1.0], -g[1.0])


def test_mocl_weighs_every_learned_lora_by_key_matching_per_row(tiny_llama_dir):
    """mocl: one key per task; each row's experts weighted by softmax(scale x cos(mean token embedding, key));
    a stage trains its LoRA and key only, the matching loss pulls the key towards its rows' queries, and a
    row that matches one key far better than the others is served by that task's LoRA alone."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = MoECLModel(base, ["a", "b"], ExpertsConfig(method="mocl", dropout=0.0))
    for t in ("a", "b"):
        model.add_task(t)
    for layer in model.moe_layers:
        _fill_experts(layer, seed=7)
    ids = torch.randint(0, 1000, (3, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    labels = torch.where(torch.arange(8) >= 6, ids, -100)
    params = model.freeze_all_but("b")
    names = {id(p): k for k, p in model.adapter_parameters().items()}
    trained = {names[id(p)] for p in params}
    assert trained == {k for k in model.adapter_parameters() if ".experts.b." in k or k == "keys.b.vector"}
    model.train()
    out = model(ids, mask, labels, "b")
    r = model.routing
    assert r.summed == ("a", "b") and set(r.weights) == {"a", "b"}
    # the weights: softmax over the two keys of 8 x cosine with the prompt tokens' mean embedding
    with torch.no_grad():
        q = masked_mean(model.base.get_input_embeddings()(ids).float(), mask * (labels == -100))
        cos = torch.stack([F.cosine_similarity(q, model.task_keys[t].vector[None], dim=-1) for t in ("a", "b")], -1)
    torch.testing.assert_close(torch.cat([r.weights["a"], r.weights["b"]], -1).view(3, 2), torch.softmax(8 * cos, -1))
    torch.testing.assert_close(out.match_loss, (1 - cos[:, 1]).mean())
    out.loss.backward()
    key = model.task_keys["b"].vector
    assert key.grad is not None and model.task_keys["a"].vector.grad is None
    # one small step on the matching loss alone raises the cosine of b's key with the rows' queries
    with torch.no_grad():
        before = F.cosine_similarity(q, key[None], dim=-1).mean()
        key.grad = None
    model.zero_grad()
    model(ids, mask, labels, "b").match_loss.backward()
    with torch.no_grad():
        key -= 0.5 * key.grad / key.grad.norm()
        assert F.cosine_similarity(q, key[None], dim=-1).mean() > before
    # each LoRA's down update enters times its row weight: with one key made to match exactly, its expert alone
    model.eval()
    with torch.no_grad():
        model.task_keys["a"].vector.copy_(q[0] * 1000)  # row 0 matches a's key far better than b's
        model.mocl_scale = 1e4
        mixed = model.hidden_states(ids[:1], mask[:1], "b")
        alone = model.hidden_states(ids[:1], mask[:1], None, only="a")
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-5)


# Calls that make the host wait for the device (on a GPU each is a synchronisation point).
_SYNCING = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy", "nonzero",
            "masked_select", "unique"}


class _Syncs(torch.overrides.TorchFunctionMode):
    """Records every tensor call that would wait for the device: a value read back to Python, or an
    output whose shape depends on the values (a boolean index)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        boolean_index = name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in _SYNCING or boolean_index:
            caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "site-packages/torch/" not in f.filename)
            if Path(caller.filename).parent.name == "trainer":  # this trainer's code, not transformers'
                self.calls.append(f"{name}{'[bool]' if boolean_index else ''} at {Path(caller.filename).name}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method, extra", [("moe_cl", "memory"), ("moe_cl", "noise"), ("olora", "none"),
                                           ("mocl", "none")])
def test_a_micro_step_never_waits_for_the_device(tiny_llama_dir, method, extra):
    """A training micro-step of this trainer's code (forward, backward, the logging window's running sums)
    reads nothing back from the device: on a GPU each read would stall the host until the queued kernels
    finish. (transformers' own check of the attention mask, once per forward, is outside; so is CPU dropout,
    which draws its seed on the host by design: dropout is off here.)"""
    from trainer.recipe import _accumulate

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = MoECLModel(base, ["a", "b"], ExpertsConfig(method=method, discriminator_extra=extra, dropout=0.0))
    for t in ("a", "b"):
        model.add_task(t)
    model.freeze_all_but("b")
    model.train()
    x = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    labels = torch.where(torch.arange(10) >= 8, x, -100)
    memory = (x[:2], mask[:2], "a") if extra == "memory" else None
    positions = answer_positions(labels)  # as the training loop computes them, on the host
    window: dict = {}
    with _Syncs() as syncs:
        out = model(x, mask, labels, "b", memory, answer_positions=positions)
        out.loss.backward()
        _accumulate(window, out, 0.5)
    assert syncs.calls == [], "\n".join(syncs.calls)
    assert window["tokens"] == 30 and window["task_loss"] == pytest.approx(0.5 * float(out.task_loss))


def test_answer_loss_reads_the_labelled_next_tokens_only():
    """answer_loss = mean cross-entropy of the head at position t against label t + 1, over the labelled
    positions, whether their flat indices come from the host (`answer_positions`) or are found here."""
    from trainer.model import answer_loss

    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(2, 5, 8, generator=g), torch.nn.Linear(8, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, -100, -100, 2]])
    by_hand = torch.stack([F.cross_entropy(head(hidden[b, t - 1]), labels[b, t]) for b, t in
                           [(0, 2), (0, 3), (1, 1), (1, 4)]]).mean()
    assert answer_positions(labels).tolist() == [1, 2, 5, 8]
    for positions in (None, answer_positions(labels)):
        assert torch.allclose(answer_loss(head, hidden, labels, positions), by_hand)


def test_olora_earlier_a_matrices_follow_a_to_its_device():
    """O-LoRA's earlier A matrices are stacked on the host before set-up; ZeRO-3 then moves the parameters
    (to the GPU) but not this buffer, so the first training forward moves it to A's device. The meta device
    stands in for a GPU here: there, a CPU buffer times a GPU A fails."""
    from trainer.moe import LoRA

    with torch.device("meta"):
        lora = LoRA(8, 4, rank=2, alpha=4)
    lora.orthogonal_to = torch.randn(2, 8)  # as freeze_all_but builds it, on the host
    lora.train()
    lora(torch.empty(3, 8, device="meta"))
    assert lora.orthogonal_to.device.type == "meta" and lora.penalty.device.type == "meta"
    assert "orthogonal_to" not in lora.state_dict()  # still a non-persistent buffer


def test_bfloat16_on_a_cpu_without_native_bf16_is_warned_about(tiny_llama_dir, capsys):
    """Without AVX512-BF16 or AMX, a CPU's bf16 matmuls take a slow fallback path: asking for bfloat16 there
    says so (model.dtype=auto picks float32 on such a CPU); with native bf16 nothing is said."""
    from trainer.base import load_base
    from trainer.config import ModelConfig
    from trainer.distributed import cpu_has_bf16

    base, _, _ = load_base(ModelConfig(path=str(tiny_llama_dir), dtype="bfloat16"))
    assert base.dtype == torch.bfloat16
    assert ("warning: model.dtype=bfloat16 on a CPU without native bf16" in capsys.readouterr().out) == (not cpu_has_bf16())
