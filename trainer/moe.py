r"""The MoE-CL layer: a frozen gated MLP with a shared LoRA expert and one LoRA expert per task.

For a token x in a decoder layer whose MLP is ``W_down(act(W_gate x) * (W_up x))``::

    proj_e(v) = W v + (alpha / r) B_e A_e dropout(v)              LoRA on gate, up and down
    h_e       = act(gate_e(x)) * up_e(x)                          (intermediate,)
    E_e(x)    = down_e(h_e)                                       (hidden,)
    [g_s, g_t] = softmax(G x)                                     token-wise gate, G: (2, hidden)
    y         = g_s E_s(x) + g_t E_t(x)                           s = shared, t = the batch's task

Because ``W_down`` is linear and ``g_s + g_t = 1``, the mixture is computed exactly with one base
down projection::

    y = W_down(g_s h_s + g_t h_t) + g_s (alpha/r) B_ds A_ds h_s + g_t (alpha/r) B_dt A_dt h_t

so a step costs one base MLP plus two rank-r updates, whatever the number of tasks learned.
The base gate and up projections run once and are shared by both experts.

The baselines (`experts.method`, see model.py) run experts without a gate, their LoRA updates
summed into the base projections: ``proj(v) = W v + sum_e (alpha/r) B_e A_e v``.

The discriminator (in `model.py`) reads the mask-aware token mean of the shared expert's output
``E_s(x)``. That mean is linear in ``h_s`` too, so it is computed from ``mean(h_s)`` in the same
base down-projection call: ``mean(E_s) = W_down mean(h_s) + mean((alpha/r) B_ds A_ds h_s)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SHARED = "shared"
ALL_TASKS_GATE = "all_tasks"


class LoRA(nn.Module):
    """The low-rank update ``(alpha/r) B A x`` of one frozen linear layer.

    Kept apart from the frozen layer so one base projection serves several experts. The parameters
    are float32 masters whatever the base dtype; the matmuls run in the input's dtype (the small
    weights are cast, not the activations), as autocast would, except float16 inputs (see forward).
    Dropout is applied by the caller, once per input tensor (see `MoECLMLP`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / rank
        # O-LoRA: earlier tasks' A matrices stacked (frozen, so a plain buffer that ZeRO-3 leaves whole);
        # a training forward then leaves sum |A A_earlier^T| in `penalty`, computed here, where A is gathered.
        self.register_buffer("orthogonal_to", None, persistent=False)
        self.penalty: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                add_to: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), plus `add_to` if given (one fused multiply-add,
        no separate pass over the output); `weight` (..., 1) multiplies each row's update.

        Scaling and weight are applied in the rank-r space, where they cost r instead of out_features
        multiplications per token."""
        if self.training and self.orthogonal_to is not None:
            if self.orthogonal_to.device != self.lora_a.device:
                # built where A was before set-up (the host); ZeRO-3 moves parameters, never buffers: moved once
                self.orthogonal_to = self.orthogonal_to.to(self.lora_a.device)
            self.penalty = (self.lora_a @ self.orthogonal_to.to(self.lora_a.dtype).T).abs().sum()
        # float16's narrow range is no place for the rank-space products: there the LoRA runs in its
        # parameters' float32 (casting the activations).
        dtype = self.lora_a.dtype if x.dtype == torch.float16 else x.dtype
        z = F.linear(x.to(dtype), self.lora_a.to(dtype))
        z = z * (self.scaling if weight is None else weight.to(dtype) * self.scaling)
        b = self.lora_b.to(dtype)
        if add_to is None:
            return F.linear(z, b).to(x.dtype)
        return torch.addmm(add_to.flatten(0, -2).to(dtype), z.flatten(0, -2), b.T).view(add_to.shape).to(add_to.dtype)


class Expert(nn.Module):
    """One LoRA expert: updates to the gate, up and down projections of a gated MLP."""

    def __init__(self, hidden: int, intermediate: int, rank: int, alpha: float):
        super().__init__()
        self.gate_proj = LoRA(hidden, intermediate, rank, alpha)
        self.up_proj = LoRA(hidden, intermediate, rank, alpha)
        self.down_proj = LoRA(intermediate, hidden, rank, alpha)


class Gate(nn.Module):
    """Token-wise softmax over [shared, task]: (..., hidden) -> (..., 2). `task_bias` is a constant added
    to the task expert's logit (0: the gate starts near one half each, as the reference)."""

    def __init__(self, hidden: int, task_bias: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(hidden, 2, bias=False)
        self.task_bias = task_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(x.to(self.proj.weight.dtype))
        if self.task_bias:
            logits = logits + logits.new_tensor([0.0, self.task_bias])
        return torch.softmax(logits, dim=-1)


@dataclass
class Routing:
    """What the current forward pass is for; one object shared by every MoE-CL layer of a model.

    Set by `MoECLModel` before each forward (the Hugging Face decoder calls ``mlp(x)`` with no
    other arguments). Layers write their per-layer statistics into it, keyed by layer index so
    a recomputation (activation checkpointing) overwrites rather than appends.
    """

    task: str | None = None          # the gated mixture of the shared expert and this task's expert
    summed: tuple[str, ...] | None = None  # instead: these experts at weight 1 each, no gate (baselines,
    #                                        extract/merge checks); () = the base MLP alone
    mask: torch.Tensor | None = None  # (batch, seq) 1 for real tokens
    collect: bool = False            # training: mean gate weights per layer
    pool: bool = False               # training: pooled shared output for the discriminators
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)      # layer -> (batch, hidden)
    gate_shared: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> scalar mean g_s
    weights: dict[str, torch.Tensor] | None = None  # mocl: summed expert -> its per-row weight (batch, 1, 1)
    query_cos: torch.Tensor | None = None           # mocl: cos(query, key) per row and summed expert


class MoECLMLP(nn.Module):
    """Replaces a decoder layer's MLP: the frozen base MLP plus keyed experts and gate(s).

    Experts are keyed data (``experts[task_name]``, plus ``experts["shared"]``); a task's expert is
    added when its stage starts. Only the shared expert and the routed task's expert run.
    """

    def __init__(self, base_mlp: nn.Module, layer_index: int, routing: Routing, hidden: int,
                 intermediate: int, rank: int, alpha: float, dropout: float, gate_mode: str,
                 shared: bool = True, task_experts: bool = True, gate_task_bias: float = 0.0):
        """gate_mode "shared" | "per_task" | "none" (no gate: the baselines sum their experts);
        `shared` / `task_experts`: whether this layer has a shared expert / one expert per task."""
        super().__init__()
        self.base = base_mlp
        self.layer_index = layer_index
        self.routing = routing  # shared plain object, not a submodule
        self.expert_args = dict(hidden=hidden, intermediate=intermediate, rank=rank, alpha=alpha)
        # LoRA input dropout, one mask per layer input: the gate and up LoRAs of every expert read the
        # same dropped x, and the experts' down LoRAs read their h_e dropped with one shared mask.
        self.dropout = Dropout(dropout)
        self.gate_mode = gate_mode
        self.gate_task_bias = gate_task_bias
        self.task_experts = task_experts
        self.experts = nn.ModuleDict({SHARED: Expert(**self.expert_args)} if shared else {})
        self.gates = nn.ModuleDict()
        if gate_mode == "shared":
            self.gates[ALL_TASKS_GATE] = Gate(hidden, gate_task_bias)

    def add_task(self, task: str) -> None:
        """Create the task's expert (B = 0, so it starts as a no-op) and, per-task mode, its gate."""
        if self.task_experts and task not in self.experts:
            self.experts[task] = Expert(**self.expert_args)
        if self.gate_mode == "per_task" and task not in self.gates:
            self.gates[task] = Gate(self.expert_args["hidden"], self.gate_task_bias)

    def gate_for(self, task: str) -> Gate:
        return self.gates[ALL_TASKS_GATE if self.gate_mode == "shared" else task]

    def trainable_modules(self, task: str) -> list[nn.Module]:
        """What a stage on `task` trains here: the shared expert and the task's expert (those this
        layer has), and the task's gate if it is gated."""
        modules = [self.experts[n] for n in (SHARED, task) if n in self.experts]
        return modules + ([self.gate_for(task)] if self.gate_mode != "none" else [])

    def adapter_modules(self) -> dict[str, nn.Module]:
        """Everything this layer adds to the base, by state-dict prefix (what is saved)."""
        return {"experts": self.experts, "gates": self.gates}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, hidden) -> (batch, seq, hidden)"""
        base, route = self.base, self.routing
        g, u = base.gate_proj(x), base.up_proj(x)  # the frozen projections, computed once
        if route.summed is not None:
            weights = route.weights or {}
            return self._summed(x, g, u, [(self.experts[n], weights.get(n)) for n in route.summed])
        x_drop = self.dropout(x)
        experts = [self.experts[SHARED], self.experts[route.task]]
        h = [base.act_fn(e.gate_proj(x_drop, add_to=g)) * e.up_proj(x_drop, add_to=u) for e in experts]
        h_drop = dropout(h, self.dropout.p, self.training)  # one mask for both experts
        w_s = self.gate_for(route.task)(x)[..., :1].to(x.dtype)  # (batch, seq, 1); w_t = 1 - w_s
        mixed = torch.lerp(h[1], h[0], w_s)  # w_s h_s + w_t h_t in one pass
        if route.collect:
            route.gate_shared[self.layer_index] = masked_mean(w_s.detach().float(), route.mask).mean()
        if not route.pool:
            out = base.down_proj(mixed)
        else:  # one call of the base down projection serves the mixture and the pooled shared output
            pooled_h = masked_mean(h[0], route.mask)  # (batch, intermediate)
            flat = mixed.reshape(-1, mixed.shape[-1])
            down = base.down_proj(torch.cat([flat, pooled_h.to(flat.dtype)]))
            out, pooled_base = down[: flat.shape[0]].view(*mixed.shape[:-1], -1), down[flat.shape[0]:]
            route.pooled[self.layer_index] = pooled_base + experts[0].down_proj(masked_mean(h_drop[0], route.mask))
        # The LoRA-down terms, their gate weights applied in rank space (inside LoRA), added in place.
        out = experts[0].down_proj(h_drop[0], w_s, add_to=out)
        return experts[1].down_proj(h_drop[1], 1 - w_s, add_to=out)

    def _summed(self, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                experts: list[tuple[Expert, torch.Tensor | None]]) -> torch.Tensor:
        """The base MLP with every given expert's LoRA updates added, each times its per-row weight
        ((batch, 1, 1); None: 1). One expert at weight 1: that expert alone."""
        if not experts:
            return self.base.down_proj(self.base.act_fn(g) * u)
        x_drop = self.dropout(x)
        for e, w in experts:
            g, u = e.gate_proj(x_drop, w, add_to=g), e.up_proj(x_drop, w, add_to=u)
        h = self.base.act_fn(g) * u
        h_drop = self.dropout(h)
        out = self.base.down_proj(h)
        for e, w in experts:
            out = e.down_proj(h_drop, w, add_to=out)
        return out


class Dropout(nn.Module):
    """`nn.Dropout` drawing its mask with `dropout` (fast on CPU)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout([x], self.p, self.training)[0]


def dropout(tensors: list[torch.Tensor], p: float, training: bool) -> list[torch.Tensor]:
    """Inverted dropout with one keep-mask for several same-shaped tensors.

    On CPU the mask is drawn as 16-bit integers by NumPy's PCG64, seeded from torch's generator (so
    `torch.manual_seed` still fixes it), and p is rounded to a multiple of 2^-16: torch's CPU Bernoulli
    sampler makes about 80 M draws/s, 10 ms for one 512 x 1536 mask, a fifth of a MoE-CL layer's
    training step on the benchmark's 135M model. Elsewhere torch's own sampler."""
    if not training or p == 0:
        return tensors
    like = tensors[0]
    if like.device.type == "cpu":
        seed = int(torch.randint(2**62, ()))
        bits = np.random.Generator(np.random.PCG64(seed)).integers(0, 2**16, like.numel(), dtype=np.uint16)
        # int16 view: uniform over [-2^15, 2^15); keep with probability 1 - round(p 2^16) / 2^16
        keep = torch.from_numpy(bits.view(np.int16)).view(like.shape) >= round(p * 2**16) - 2**15
        scale = keep.to(like.dtype).mul_(2**16 / (2**16 - round(p * 2**16)))
    else:
        scale = torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)
    return [t * scale for t in tensors]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of the real tokens. x: (batch, seq, d), mask: (batch, seq) -> (batch, d)"""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype)
    return torch.bmm(m.unsqueeze(1), x).squeeze(1) / m.sum(dim=1, keepdim=True).clamp_min(1)



class TaskKey(nn.Module):
    """MoCL's key of one task: (batch, hidden) queries -> (batch,) cosine similarity with the key. A module
    of its own so ZeRO-3 gathers the vector when it is called. Initialised uniform in [0, 1), as MoCL."""

    def __init__(self, hidden: int):
        super().__init__()
        self.vector = nn.Parameter(torch.rand(hidden))

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(query, self.vector.to(query.dtype).unsqueeze(0), dim=-1)


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by -scale backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return GradientReversal.apply(x, scale)


class Discriminator(nn.Module):
    """Predicts the task id from a layer's pooled shared-expert output: (batch, hidden) -> (batch, tasks)."""

    def __init__(self, hidden: int, num_tasks: int, kind: str, mlp_hidden: int):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(hidden, num_tasks)
        else:
            self.net = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, num_tasks))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled.to(next(self.net.parameters()).dtype))
