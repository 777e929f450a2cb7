r"""Serving without a task id: route a request to a learned task from the request's own text.

Features (`MoECLModel.base_features`): the frozen base alone, no expert, runs its first `router.layer`
decoder layers (then its final norm) on the request's text alone (a prefix token, BOS or else EOS,
then the text's tokens, at most data.max_length), and the hidden states are averaged over every
token but the prefix. The text is what a request without a task id carries: a classification row's
text, a generation row's instruction and input; never the task's instruction or options, which would
name the task. The base is frozen, so a row's features never change from one stage to the next.

Statistics of task t, from up to `router.max_rows` of its training rows, computed at its stage and
never changed afterwards (no raw row is kept):

    n_t, mu_t (mean), v_t (per-dimension variance), s_t (its training rows' own scores, sorted)

and, shared by the tasks, the pooled within-task scatter W = sum_t sum_{x of t} (x - mu_t)(x - mu_t)^T
(each stage adds its task's term). Routing is a linear discriminant with equal priors:

    Sigma   = W / (N - T),  shrunk:  Sigma_s = (1 - s) Sigma + s (tr Sigma / d) I      (s = router.shrinkage)
    task(x) = argmin_t (x - mu_t)^T Sigma_s^-1 (x - mu_t)

The confidence compares the request with the routed task alone, through the task's own statistics
(so a later stage never changes it):

    own_t(x)          = mean_i (x_i - mu_t,i)^2 / v_t,i            (1 on average over t's training rows)
    routed_confidence = share of t's training rows with own_t >= own_t(x)   (0: farther than all of them)

Under ZeRO-3 every rank computes the features of its share of the rows; the feature matrix is
all-reduced, so every rank holds the same statistics, and the main rank saves them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from .checkpoint import read_tagged, save_adapters
from .distributed import Strategy

ROUTER = "router.safetensors"
FORMAT = "moe-cl-router"


def request_text(row: dict) -> str:
    """What a request carries without its task id: a classification row's text, or a generation row's
    instruction and input (the instruction is the request itself there, not the task's)."""
    if row.get("instruction"):
        return row["instruction"] + ("\n\n" + row["text"] if row.get("text") else "")
    return row["text"]


def request_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text as the router reads it: a prefix token (BOS, else EOS), then the text's
    tokens, cut to `max_length`."""
    prefix = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [(prefix + x)[:max_length] for x in ids]


@torch.no_grad()
def gather_features(model, ids: list[list[int]], layers: int, strategy: Strategy, batch_size: int,
                    pad_id: int) -> torch.Tensor:
    """Features of every row (n, hidden) float64, on every rank: each rank runs its share of the rows
    (the same number of batches on every rank) and the matrix is all-reduced."""
    was_training = model.training
    model.eval()
    indices, valid = strategy.shard(len(ids))
    order = sorted(range(len(indices)), key=lambda i: len(ids[indices[i]]))  # less padding per batch
    dim = model.base.config.hidden_size
    out = torch.zeros(len(ids), dim, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = [ids[indices[i]] for i in chunk]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=strategy.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=strategy.device)
        feats = strategy.run(model, "base_features", input_ids, mask, layers).double().cpu()
        for i, f in zip(chunk, feats):
            if valid[i]:
                out[indices[i]] = f
    model.train(was_training)
    return strategy.all_sum(out)


@dataclass
class Router:
    """Per-task statistics of the base's features and the pooled within-task scatter (module docstring)."""

    layer: int
    tasks: list[str] = field(default_factory=list)
    count: dict[str, int] = field(default_factory=dict)
    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    var: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    scatter: torch.Tensor | None = None  # (d, d) pooled over `pooled`
    pooled: dict[str, int] = field(default_factory=dict)  # the tasks in `scatter` and their row counts
    shrinkage: float = 0.1
    min_confidence: float = 0.001
    # Where the float64 arithmetic runs (fitting, the shared precision, routing): the trainer's device, so
    # a GPU rank does it there rather than on one host core; statistics stay where they were computed.
    device: torch.device = field(default=torch.device("cpu"), compare=False)
    _precision: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # computed once

    def with_task(self, name: str, feats: torch.Tensor) -> "Router":
        """A router that also knows `name`, from its rows' features (n, d); this one is left as it is."""
        if name in self.tasks:
            raise ValueError(f"the router already has task {name!r}")
        x = feats.to(self.device, torch.float64)
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"task {name!r}: the router needs at least 2 rows, got {n}")
        mu = x.mean(dim=0)
        centred = x - mu
        var = (centred ** 2).mean(dim=0)
        scatter = centred.T @ centred
        own = _own_score(x, mu, _floored(var))
        return Router(self.layer, self.tasks + [name], {**self.count, name: n}, {**self.mean, name: mu},
                      {**self.var, name: var}, {**self.scores, name: own.sort().values},
                      scatter if self.scatter is None else self.scatter.to(self.device) + scatter,
                      {**self.pooled, name: n}, self.shrinkage, self.min_confidence, self.device)

    def subset(self, tasks: list[str]) -> "Router":
        """The statistics of `tasks` only; the shared covariance stays the one of every task (a metric)."""
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            raise KeyError(f"the router has no task {missing}; it knows {self.tasks}")
        pick = lambda d: {t: d[t] for t in tasks}  # noqa: E731
        return Router(self.layer, list(tasks), pick(self.count), pick(self.mean), pick(self.var), pick(self.scores),
                      self.scatter, dict(self.pooled), self.shrinkage, self.min_confidence, self.device)

    def precision(self) -> torch.Tensor:
        """Sigma_s^-1 (d, d), float64 (computed on first use: a router is not changed in place)."""
        if self._precision is None:
            self._precision = self._shrunk_inverse()
        return self._precision

    def _shrunk_inverse(self) -> torch.Tensor:
        n, t = sum(self.pooled.values()), len(self.pooled)
        sigma = self.scatter.to(self.device) / max(n - t, 1)
        d = sigma.shape[0]
        s = self.shrinkage
        eye = torch.eye(d, dtype=sigma.dtype, device=sigma.device)
        shrunk = (1 - s) * sigma + s * (sigma.diagonal().mean().clamp_min(1e-12)) * eye
        return torch.cholesky_inverse(torch.linalg.cholesky(shrunk))

    def route(self, feats: torch.Tensor) -> "Routes":
        """The task of every row of `feats` (n, d), with its distances and confidence."""
        if not self.tasks:
            raise ValueError("the router knows no task yet")
        x = feats.to(self.device, torch.float64)
        mus = torch.stack([self.mean[t].to(self.device) for t in self.tasks])  # (T, d)
        p = self.precision()
        xp = x @ p
        # (x - mu)^T P (x - mu) = x P x - 2 x P mu + mu P mu
        dist = (xp * x).sum(-1, keepdim=True) - 2 * xp @ mus.T + ((mus @ p) * mus).sum(-1)
        best = dist.argmin(dim=-1)
        confidence = torch.empty(len(x), dtype=torch.float64, device=x.device)
        for i, t in enumerate(self.tasks):
            rows = best == i
            if rows.any():
                own = _own_score(x[rows], self.mean[t].to(x.device), _floored(self.var[t].to(x.device)))
                train = self.scores[t].to(x.device)
                beyond = len(train) - torch.searchsorted(train, own, right=False)  # training rows scoring >= own
                confidence[rows] = beyond.double() / len(train)
        return Routes([self.tasks[i] for i in best.tolist()], confidence.cpu(), dist.cpu())

    # -- files ----------------------------------------------------------------------------------------

    def save(self, path: Path) -> str:
        """Write to `path` (safetensors); returns its sha256."""
        tensors = {"pooled.scatter": self.scatter.cpu().contiguous()}
        for t in self.tasks:
            tensors[f"tasks.{t}.mean"] = self.mean[t].cpu()
            tensors[f"tasks.{t}.var"] = self.var[t].cpu()
            tensors[f"tasks.{t}.scores"] = self.scores[t].cpu()
        meta = {"layer": self.layer, "tasks": self.tasks, "count": self.count, "pooled": self.pooled,
                "shrinkage": self.shrinkage, "min_confidence": self.min_confidence}
        return save_adapters(path, tensors, {"format": FORMAT, "router": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> "Router":
        """Read a router file (checked against `sha256` when given)."""
        tensors, meta = read_tagged(path, sha256, FORMAT, "task router")
        info = json.loads(meta["router"])
        tasks = info["tasks"]
        return cls(info["layer"], tasks, info["count"], {t: tensors[f"tasks.{t}.mean"] for t in tasks},
                   {t: tensors[f"tasks.{t}.var"] for t in tasks}, {t: tensors[f"tasks.{t}.scores"] for t in tasks},
                   tensors["pooled.scatter"], info["pooled"], info["shrinkage"], info["min_confidence"])


@dataclass
class Routes:
    tasks: list[str]            # routed task per row
    confidence: torch.Tensor    # (n,) share of the routed task's training rows at least as far from it
    distances: torch.Tensor     # (n, T) squared Mahalanobis distance to every task

    def flagged(self, min_confidence: float) -> list[bool]:
        return (self.confidence < min_confidence).tolist()


def _floored(var: torch.Tensor) -> torch.Tensor:
    """Variances with a floor (1e-6 of their mean), so a constant feature cannot divide by zero."""
    return var.clamp_min(1e-6 * var.mean().clamp_min(1e-12))


def _own_score(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return ((x - mu) ** 2 / var).mean(dim=-1)
