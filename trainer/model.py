"""MoECLModel: a frozen Hugging Face decoder with MoE-CL layers in every MLP and per-layer discriminators.

One batch is one task (training and evaluation both go task by task), so routing is per batch:
the shared expert and that task's expert, or the shared expert alone for a task not learned yet.

Training objective of a stage on task t (lambda = `experts.adversarial_weight`)::

    L = L_task + L_D,   L_D = mean_layers CE(D_l(R_lambda(mean_tokens E_s(x))), t)

where R_lambda is a gradient-reversal layer: the discriminators D_l minimise L_D, while
everything upstream of them (the shared expert, gates, earlier layers) receives -lambda * dL_D.

`experts.method` selects MoE-CL or a baseline on the same layers (see `METHODS`); a baseline is
only a different routing, set of experts and trainable parameters, plus O-LoRA's penalty.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExpertsConfig
from .moe import SHARED, Discriminator, MoECLMLP, Routing, TaskKey, masked_mean, reverse_gradient

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
IGNORE = -100
NOISE = "noise"  # the discriminators' "not a task" class (experts.discriminator_extra=noise)
# method -> (shared expert, one expert per task, gated mixture, discriminators)
METHODS = {
    "moe_cl": (True, True, True, True),
    "moe_cl_no_gan": (True, True, True, False),
    "seq_lora": (True, False, False, False),       # the shared expert is the one LoRA
    "per_task_lora": (False, True, False, False),  # the task's expert alone, task id known
    "olora": (False, True, False, False),          # every learned task's expert summed, no task id
    "mocl": (False, True, False, False),           # every learned task's expert, weighted by key matching
}


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into (batch * seq) of the positions whose next token is labelled: where `answer_loss`
    reads. Computed where the labels are built (on the host, see `train_stage`), they let a GPU step
    select those positions without a boolean index, whose output size the host must wait for."""
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


def answer_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the labelled positions; `head` runs on those positions only.
    `positions`: `answer_positions(labels)`, on hidden's device (computed here when not given)."""
    if positions is None:
        positions = answer_positions(labels)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return F.cross_entropy(head(picked).float(), labels.reshape(-1).index_select(0, positions + 1))


def method_experts(method: str, learned: list[str]) -> list[str]:
    """The experts a model of `method` holds after learning `learned`."""
    shared, per_task, _, _ = METHODS[method]
    return ([SHARED] if shared else []) + (list(learned) if per_task else [])


def routed_experts(method: str, task: str | None, learned: list[str]) -> tuple[str, ...] | None:
    """The experts a forward for `task` runs, summed at weight 1 each; None: MoE-CL's gated mixture of
    the shared expert and the task's. A task not learned yet (forward transfer) gets what the method
    has without it: MoE-CL and seq_lora the shared expert, per_task_lora the base alone."""
    if METHODS[method][2]:
        return None if task in learned else (SHARED,)
    if method == "seq_lora":
        return (SHARED,)
    if method == "per_task_lora":
        return (task,) if task in learned else ()
    return tuple(learned)  # olora, mocl: task-id free, every LoRA learned so far (mocl weighs them per row)


class StepOutput(NamedTuple):  # a named tuple: ZeRO-3 finds the tensors in it for its backward hooks
    loss: torch.Tensor          # task loss + discriminator loss (through the reversal)
    task_loss: torch.Tensor
    disc_loss: torch.Tensor | None
    orth_loss: torch.Tensor | None  # olora's penalty (unweighted)
    match_loss: torch.Tensor | None  # mocl's key-matching loss (unweighted)
    disc_acc: dict[str, torch.Tensor] | None  # the discriminators' accuracy per class seen (a task, NOISE)
    gate_shared: list[torch.Tensor]  # per layer: mean gate weight on the shared expert (detached)
    tokens: torch.Tensor        # non-pad tokens in the batch (left on the device, as every field)


def check_supported(base: nn.Module, source: str = "") -> None:
    """Raise a clear error unless `base` is a decoder with gated MLPs that MoE-CL can wrap."""
    model_type = getattr(base.config, "model_type", "?")
    where = f" at {source}" if source else ""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}{where} is not supported: MoE-CL wraps gated MLPs "
                         f"(gate_proj, up_proj, down_proj, act_fn); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for i, layer in enumerate(base.get_decoder().layers):
        missing = [a for a in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(layer.mlp, a)]
        if missing:
            raise ValueError(f"layer {i} of {model_type!r}{where} has an MLP without {missing}; "
                             f"MoE-CL needs a gated MLP (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


class MoECLModel(nn.Module):
    """The frozen base with MoE-CL layers; `tasks` is the whole order (the discriminators' classes)."""

    def __init__(self, base: nn.Module, tasks: list[str], cfg: ExpertsConfig, discriminators: bool = True):
        super().__init__()
        check_supported(base)
        base.requires_grad_(False)
        self.base = base
        self.tasks = list(tasks)
        self.method = cfg.method
        self.learned_tasks: list[str] = []  # tasks added so far, in order
        self.adversarial_weight = cfg.adversarial_weight
        self.discriminator_extra = cfg.discriminator_extra
        self.orthogonal_weight = cfg.orthogonal_weight
        self.mocl_scale, self.mocl_match_weight = cfg.mocl_scale, cfg.mocl_match_weight
        self.routing = Routing()
        shared, per_task, self.mixture, adversarial = METHODS[cfg.method]
        hidden = base.config.hidden_size
        for i, layer in enumerate(base.get_decoder().layers):
            mlp = layer.mlp
            layer.mlp = MoECLMLP(mlp, i, self.routing, hidden=hidden, intermediate=mlp.gate_proj.out_features,
                                 rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                                 gate_mode=cfg.gate if self.mixture else "none", shared=shared, task_experts=per_task,
                                 gate_task_bias=cfg.gate_task_bias)
        # MoCL: one key per task, matched with a request's mean token embedding (empty for other methods)
        self.task_keys = nn.ModuleDict()
        # Training needs them; serving a bundle does not (discriminators=False).
        self.discriminators = nn.ModuleList(
            Discriminator(hidden, len(self.classes), cfg.discriminator, cfg.discriminator_hidden)
            for _ in (self.moe_layers if discriminators and adversarial else []))

    @property
    def classes(self) -> list[str]:
        """The discriminators' classes: every task of the order, then NOISE with discriminator_extra=noise."""
        return self.tasks + ([NOISE] if self.discriminator_extra == "noise" else [])

    @property
    def moe_layers(self) -> list[MoECLMLP]:
        return [layer.mlp for layer in self.base.get_decoder().layers]

    # -- what is trained and saved, declared by the modules themselves --------------------------

    def add_task(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not in this model's order {self.tasks}")
        for layer in self.moe_layers:
            layer.add_task(task)
        if self.method == "mocl" and task not in self.task_keys:
            self.task_keys[task] = TaskKey(self.base.config.hidden_size)
        if task not in self.learned_tasks:
            self.learned_tasks.append(task)

    def trainable_parameters(self, task: str) -> list[nn.Parameter]:
        """The parameters a stage on `task` optimises: shared + task experts, gate(s), discriminators."""
        modules = [m for layer in self.moe_layers for m in layer.trainable_modules(task)]
        modules.append(self.discriminators)
        if task in self.task_keys:
            modules.append(self.task_keys[task])
        return _unique(p for m in modules for p in m.parameters())

    def shared_expert_parameters(self) -> list[nn.Parameter]:
        """The shared expert of the MoE-CL mixture (seq_lora's single LoRA is not one: none)."""
        if not self.mixture:
            return []
        return [p for layer in self.moe_layers for p in layer.experts[SHARED].parameters()]

    def freeze_all_but(self, task: str) -> list[nn.Parameter]:
        """requires_grad only on `task`'s trainable parameters; returns them. Old experts stay frozen."""
        self.requires_grad_(False)
        params = self.trainable_parameters(task)
        for p in params:
            p.requires_grad_(True)
        earlier = self.learned_tasks[: self.learned_tasks.index(task)]
        if self.method == "olora" and earlier:  # earlier A matrices as they are now: frozen for this stage
            for layer in self.moe_layers:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    olds = [getattr(layer.experts[s], proj).lora_a.detach() for s in earlier]
                    getattr(layer.experts[task], proj).orthogonal_to = torch.cat(olds).clone()
        return params

    def adapter_names(self) -> dict[str, str]:
        """Module parameter name -> saved adapter name (to read checkpoints keyed by module names)."""
        by_id = {id(p): key for key, p in self.adapter_parameters().items()}
        return {name: by_id[id(p)] for name, p in self.named_parameters() if id(p) in by_id}

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every added parameter (all experts, gates, discriminators) by its saved name."""
        named = {}
        for i, layer in enumerate(self.moe_layers):
            for prefix, module in layer.adapter_modules().items():
                named.update({f"layers.{i}.{prefix}.{k}": p for k, p in module.named_parameters()})
        named.update({f"discriminators.{k}": p for k, p in self.discriminators.named_parameters()})
        named.update({f"keys.{k}": p for k, p in self.task_keys.named_parameters()})
        return named

    # -- forward passes ---------------------------------------------------------------------------

    # the passes `forward` runs: a training step, and every evaluation and serving pass
    ENTRIES = ("step", "option_token_logits", "option_logprobs", "generate", "base_features")

    def forward(self, *args, entry: str = "step", **kwargs):
        """The root module's one entry: `entry` names the pass to run (default: a training step's forward).

        Evaluation passes come through here as well (`Strategy.run`), so that each pass starts with a call of
        the root module: DeepSpeed ZeRO-3 prefetches partitioned parameters in the order modules ran between
        two such calls, and without them every module's gather would wait for its own all-gather."""
        if entry not in self.ENTRIES:
            raise ValueError(f"entry {entry!r}: MoECLModel runs {', '.join(self.ENTRIES)}")
        return getattr(self, entry)(*args, **kwargs)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             task: str, memory: tuple[torch.Tensor, torch.Tensor, str] | None = None,
             answer_positions: torch.Tensor | None = None) -> StepOutput:
        """A training step's forward. input_ids, attention_mask, labels: (batch, seq). `memory`: (ids, mask,
        task) of stored rows of one earlier task, run for the discriminator loss alone (discriminator_extra=memory).
        `answer_positions`: see `answer_positions`. Nothing is read back from the device here."""
        if task not in self.learned_tasks:
            raise KeyError(f"task {task!r} has no expert yet; call add_task first")
        # MoCL's query reads the prompt alone, as at evaluation
        query_mask = attention_mask * (labels == IGNORE) if self.method == "mocl" else None
        hidden = self.hidden_states(input_ids, attention_mask, task, collect=self.training, query_mask=query_mask)
        task_loss = self.answer_loss(hidden, labels, answer_positions)
        gates = [self.routing.gate_shared[i] for i in sorted(self.routing.gate_shared)]
        disc_loss = disc_acc = orth_loss = match_loss = None
        if self.method == "mocl":  # the task's key is pulled towards its rows' queries: mean (1 - cos)
            cos = self.routing.query_cos[:, self.routing.summed.index(task)]
            match_loss = (1 - cos).mean()
        loss = task_loss
        if self.training and len(self.discriminators):
            disc_loss, disc_acc = self.discriminator_loss(task)
            if memory is not None:  # the earlier task's rows routed as deployed (its own expert, frozen)
                self.hidden_states(memory[0], memory[1], memory[2], collect=True)
                memory_loss, memory_acc = self.discriminator_loss(memory[2])
                disc_loss, disc_acc = disc_loss + memory_loss, {**disc_acc, **memory_acc}
            loss = loss + disc_loss
        if self.method == "olora" and self.learned_tasks.index(task) > 0:
            orth_loss = self.orthogonality_loss(task)
            loss = loss + self.orthogonal_weight * orth_loss
        if match_loss is not None:
            loss = loss + self.mocl_match_weight * match_loss
        return StepOutput(loss, task_loss, disc_loss, orth_loss, match_loss, disc_acc, gates, attention_mask.sum())

    def orthogonality_loss(self, task: str) -> torch.Tensor:
        """O-LoRA's penalty, sum over layers and projections of |A_task A_s^T| for every earlier task s,
        as computed by `task`'s LoRAs in the last training forward (see `freeze_all_but`)."""
        return torch.stack([getattr(layer.experts[task], p).penalty
                            for layer in self.moe_layers for p in ("gate_proj", "up_proj", "down_proj")]).sum()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None,
                      collect: bool = False, only: str | None = None, query_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Final hidden states (batch, seq, hidden) with `task` routed (None: shared expert only);
        `only` runs that single expert alone instead. `query_mask`: the tokens MoCL's query averages
        (default: attention_mask)."""
        self._route(task, attention_mask, collect, only, input_ids=input_ids, query_mask=query_mask)
        out = self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def base_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: int) -> torch.Tensor:
        """The task router's features (see router.py): the frozen base alone, no expert, through its first
        `layers` decoder layers and its final norm, averaged over every real token but the first (where
        Llama-family models park outsized activations). input_ids, attention_mask: (batch, seq) ->
        (batch, hidden) float32. The later layers do not run."""
        self._route(None, attention_mask, collect=False, base_only=True)
        decoder = self.base.get_decoder()
        every = decoder.layers
        decoder.layers = every[:layers]  # the decoder runs `self.layers[:num_hidden_layers]`
        try:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        finally:
            decoder.layers = every
        mask = attention_mask.clone()
        mask[:, 0] = 0
        return masked_mean(hidden.float(), mask)

    def answer_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled (answer) tokens only.

        The vocabulary projection runs on those positions alone: (answer tokens, vocab) logits,
        not (batch * seq, vocab).
        """
        return answer_loss(self.base.get_output_embeddings(), hidden, labels, positions)

    @torch.no_grad()
    def option_token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None,
                            tokens: list[int]) -> torch.Tensor:
        """Logits of the option tokens after each right-padded prompt: (batch, len(tokens)) float32."""
        hidden = self.hidden_states(input_ids, attention_mask, task)
        return self.logits_at(hidden, attention_mask.sum(dim=1) - 1)[:, tokens]

    def logits_at(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at one position per row. hidden: (batch, seq, hidden), positions: (batch,)"""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.base.get_output_embeddings()(hidden[rows, positions]).float()

    @torch.no_grad()
    def option_logprobs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options: torch.Tensor,
                        task: str | None, max_pairs: int | None = None) -> torch.Tensor:
        """log P(option | prompt) for every prompt and option: (batch, num_options).

        The prompts (left-padded, (batch, seq)) run once; their key/value cache is repeated for the
        options (right-padded with IGNORE, (num_options, len)), which run as short batches. Every
        (prompt, option) pair holds a copy of its prompt's cache, so at most `max_pairs` pairs run at once
        (None: all): the options in groups, and more prompts than that in turn. Evaluation memory is then
        bounded whatever the number of options."""
        b, k = prompt_ids.shape[0], options.shape[0]
        max_pairs = max_pairs or b * k
        if b > max_pairs:
            return torch.cat([self.option_logprobs(prompt_ids[i:i + max_pairs], prompt_mask[i:i + max_pairs], options,
                                                   task, max_pairs) for i in range(0, b, max_pairs)])
        self._route(task, prompt_mask, collect=False, input_ids=prompt_ids)
        weights = self.routing.weights  # mocl: each prompt's expert weights
        decoder = self.base.get_decoder()
        positions = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
        out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
        group = max(1, max_pairs // b)
        scores = []
        for j in range(0, k, group):
            last = j + group >= k  # the last group may extend the prompts' own cache; the others a copy
            cache = out.cache if last else copy.deepcopy(out.cache)
            self.routing.weights = weights
            scores.append(self._continuations(out.last_hidden_state, cache, prompt_mask, positions, options[j:j + group]))
        return torch.cat(scores, dim=1)

    def _continuations(self, prompt_states: torch.Tensor, cache, prompt_mask: torch.Tensor, positions: torch.Tensor,
                       options: torch.Tensor) -> torch.Tensor:
        """log P(option | prompt), (batch, options), from the prompts' last states and cache (extended here)."""
        b, k = prompt_mask.shape[0], options.shape[0]
        decoder, head = self.base.get_decoder(), self.base.get_output_embeddings()
        cache.batch_repeat_interleave(k)
        if self.routing.weights:  # mocl: each prompt's expert weights, for each of its options
            self.routing.weights = {t: w.repeat_interleave(k, 0) for t, w in self.routing.weights.items()}
        valid = (options != IGNORE).repeat(b, 1)  # (b*k, len)
        ids = options.clamp_min(0).repeat(b, 1)
        mask = torch.cat([prompt_mask.repeat_interleave(k, 0), valid.long()], dim=1)
        cont_pos = positions[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(ids.shape[1], device=ids.device)
        cont = decoder(input_ids=ids, attention_mask=mask, position_ids=cont_pos, cache=cache,
                       use_cache=False).last_hidden_state
        # Token j of an option is predicted from the prompt's last state (j = 0) or option state j-1.
        states = torch.cat([prompt_states[:, -1:].repeat_interleave(k, 0), cont[:, :-1]], dim=1)
        logp = torch.log_softmax(head(states[valid]).float(), dim=-1).gather(1, ids[valid].unsqueeze(1)).squeeze(1)
        rows = valid.nonzero()[:, 0]
        return torch.zeros(b * k, device=logp.device).index_add_(0, rows, logp).view(b, k)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None,
                 max_new_tokens: int, pad_token_id: int, eos_token_id: int, synced: bool = False,
                 base_only: bool = False) -> torch.Tensor:
        """Greedy continuation of left-padded prompts; returns only the new tokens (batch, <= max_new).
        `base_only`: the frozen base alone, no expert."""
        self._route(task, attention_mask, collect=False, base_only=base_only, input_ids=input_ids)
        out = self.base.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                                 eos_token_id=eos_token_id, synced_gpus=synced)
        return out[:, input_ids.shape[1]:]

    def discriminator_loss(self, task: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of every layer's discriminator on the pooled shared output of the last forward
        (all rows of `task`), through the reversal: the discriminators minimise it, the shared expert and
        gates upstream get -lambda times its gradient. With discriminator_extra=noise each layer's
        discriminator also sees as many samples of N(0, 1) (ACL's fake class; no gradient upstream: they
        come from no parameter), labelled NOISE. Returns the loss (mean over layers) and the
        discriminators' accuracy per class seen (mean over layers)."""
        losses, correct = [], {task: []}
        noise = self.discriminator_extra == "noise"
        if noise:
            correct[NOISE] = []
        for i, disc in enumerate(self.discriminators):
            pooled = self.routing.pooled[i]
            batch = pooled.shape[0]
            feats = reverse_gradient(pooled, self.adversarial_weight)
            target = torch.full((batch,), self.classes.index(task), dtype=torch.long, device=pooled.device)
            if noise:  # as ACL: N(0, 1) in the discriminator's input space, as many as real rows
                feats = torch.cat([feats, torch.randn_like(pooled)])
                target = torch.cat([target, torch.full_like(target, self.classes.index(NOISE))])
            logits = disc(feats).float()
            losses.append(F.cross_entropy(logits, target))
            hit = (logits.argmax(-1) == target).float().detach()
            correct[task].append(hit[:batch].mean())
            if noise:
                correct[NOISE].append(hit[batch:].mean())
        return torch.stack(losses).mean(), {c: torch.stack(v).mean() for c, v in correct.items()}

    def _route(self, task: str | None, mask: torch.Tensor, collect: bool, only: str | None = None,
               base_only: bool = False, input_ids: torch.Tensor | None = None,
               query_mask: torch.Tensor | None = None) -> None:
        """Which experts the next forward runs (`routed_experts`, `only` that one, or none: `base_only`),
        and, for mocl, each row's weight on them from its `input_ids` (see `composition`)."""
        experts = self.moe_layers[0].experts
        if only is not None and only not in experts:
            raise KeyError(f"no expert {only!r}; this model has {list(experts)}")
        summed = (() if base_only else (only,) if only is not None
                  else routed_experts(self.method, task, self.learned_tasks))
        r = self.routing
        r.task, r.summed, r.mask = (task if summed is None else None), summed, mask
        r.collect, r.pool = collect and summed is None, collect and summed is None and len(self.discriminators) > 0
        r.pooled.clear()
        r.gate_shared.clear()
        r.weights = r.query_cos = None
        if self.method == "mocl" and summed and only is None:
            if input_ids is None:
                raise ValueError("mocl weighs its experts by each row's tokens: pass input_ids")
            r.weights, r.query_cos = self.composition(input_ids, mask if query_mask is None else query_mask, summed)

    @torch.no_grad()
    def mocl_query(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MoCL's query of each row: (batch, hidden) float32, its mean frozen token embedding over `mask`."""
        return masked_mean(self.base.get_input_embeddings()(input_ids).float(), mask)

    def composition(self, input_ids: torch.Tensor, mask: torch.Tensor, tasks: tuple[str, ...]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """MoCL's weights of `tasks`' experts per row: softmax over tasks of scale x cos(query, key_t), the
        query being the row's mean (frozen) token embedding over `mask`. Returns ({task: (batch, 1, 1)},
        the cosines (batch, tasks))."""
        query = self.mocl_query(input_ids, mask)
        cos = torch.stack([self.task_keys[t](query) for t in tasks], dim=-1)
        w = torch.softmax(self.mocl_scale * cos, dim=-1)
        return {t: w[:, i].view(-1, 1, 1) for i, t in enumerate(tasks)}, cos


def checkpoint_layers(model: MoECLModel) -> None:
    """Activation checkpointing (`train.activation_checkpointing`): in a training forward each decoder
    layer keeps only its input, and backward recomputes it with the forward's RNG state (same dropout).

    torch's non-reentrant checkpoint, set on the layers by transformers. Not the reentrant one, nor
    `deepspeed.checkpointing.checkpoint` (reentrant too; DeepSpeed's non-reentrant variant only adds
    activation partitioning for model parallelism): reentrant runs the forward under no_grad and
    differentiates only what the layer returns, so `Routing.pooled`, which MoE-CL layers hand to the
    discriminators on the side, would carry no gradient and the adversarial term would silently stop
    reaching the shared expert and gates. Non-reentrant builds the usual graph and only re-creates the
    tensors it saved, so side outputs keep their gradient (a recomputation may write `pooled` /
    `gate_shared` again, under the same layer keys, after they were used). Under ZeRO-3 nothing more is
    needed: transformers checkpoints the layer's `forward`, and the recomputation calls the submodules,
    whose own hooks gather their partitioned weights again (tested with 2 ranks: the same adapters).
    """
    model.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the embeddings' output require grad, which only the reentrant variant needs;
    # kept, it would add a backward through layer 0's attention for a gradient nothing uses.
    model.base.disable_input_require_grads()


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


__all__ = ["MoECLModel", "StepOutput", "METHODS", "method_experts", "routed_experts", "check_supported", "SUPPORTED_MODEL_TYPES", "SHARED", "IGNORE"]
