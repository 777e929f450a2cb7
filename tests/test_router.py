"""The task router (trainer/router.py): its statistics and decisions on a hand-made case, exactly; its
file round trip and errors; and its features, the frozen base's alone, whatever the experts hold."""

from __future__ import annotations

import pytest
import torch

from trainer.checkpoint import CheckpointError, save_adapters
from trainer.config import ExpertsConfig
from trainer.distributed import LocalStrategy
from trainer.model import MoECLModel
from trainer.router import Router, gather_features, request_ids, request_text

# Two tasks in 2-D. a: (0,0), (2,2): mean (1,1), variance (1,1), scatter [[2,2],[2,2]].
# b: (4,0), (6,-2): mean (5,-1), variance (1,1), scatter [[2,-2],[-2,2]].
# Pooled scatter 4 I over N - T = 2 degrees of freedom: Sigma = 2 I, which shrinking towards its mean
# variance leaves as it is: precision I / 2.
A = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
B = torch.tensor([[4.0, 0.0], [6.0, -2.0]], dtype=torch.float64)


def _router() -> Router:
    return Router(layer=3).with_task("a", A).with_task("b", B)


def test_statistics_are_exact_on_a_hand_made_case():
    r = _router()
    assert r.tasks == ["a", "b"] and r.count == {"a": 2, "b": 2} and r.pooled == {"a": 2, "b": 2}
    assert torch.equal(r.mean["a"], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(r.mean["b"], torch.tensor([5.0, -1.0], dtype=torch.float64))
    assert torch.equal(r.var["a"], torch.ones(2, dtype=torch.float64))
    assert torch.equal(r.scatter, torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    # Each training row's own score: mean over dimensions of (x - mu)^2 / var = 1.
    assert torch.equal(r.scores["a"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(r.precision(), torch.eye(2, dtype=torch.float64) / 2, rtol=0, atol=1e-15)


def test_routes_distances_and_confidence_are_exact():
    r = _router()
    x = torch.tensor([[1.0, 1.0], [1.0, 3.0], [5.0, -1.5]], dtype=torch.float64)
    routes = r.route(x)
    assert routes.tasks == ["a", "a", "b"]
    # (x - mu)^T (I / 2) (x - mu)
    torch.testing.assert_close(routes.distances, torch.tensor([[0.0, 10.0], [2.0, 16.0], [11.125, 0.125]],
                                                              dtype=torch.float64), rtol=0, atol=1e-12)
    # own scores 0, 2 and 0.125 against training scores (1, 1): at least as far as 2, 0 and 2 of them
    assert routes.confidence.tolist() == [1.0, 0.0, 1.0]
    assert routes.flagged(0.001) == [False, True, False]


def test_a_new_task_leaves_the_old_statistics_untouched():
    one = Router(layer=3).with_task("a", A)
    before = {k: v.clone() for k, v in (("mean", one.mean["a"]), ("var", one.var["a"]), ("scores", one.scores["a"]))}
    scatter = one.scatter.clone()
    two = one.with_task("b", B)
    assert torch.equal(one.scatter, scatter) and one.tasks == ["a"]  # the earlier router as it was
    for k, v in before.items():
        assert torch.equal(getattr(two, k)["a"], v)
    with pytest.raises(ValueError, match="already has task 'a'"):
        two.with_task("a", A)
    with pytest.raises(ValueError, match="at least 2 rows"):
        two.with_task("c", A[:1])


def test_subset_keeps_the_shared_covariance():
    sub = _router().subset(["b"])
    assert sub.tasks == ["b"] and torch.equal(sub.scatter, _router().scatter) and sub.pooled == {"a": 2, "b": 2}
    assert sub.route(torch.tensor([[0.0, 0.0]], dtype=torch.float64)).tasks == ["b"]
    with pytest.raises(KeyError, match="no task"):
        _router().subset(["c"])


def test_file_round_trip_and_errors(tmp_path):
    r = _router()
    sha = r.save(tmp_path / "router.safetensors")
    back = Router.load(tmp_path / "router.safetensors", sha)
    assert (back.layer, back.tasks, back.count, back.pooled) == (3, ["a", "b"], {"a": 2, "b": 2}, {"a": 2, "b": 2})
    for t in ("a", "b"):
        assert torch.equal(back.mean[t], r.mean[t]) and torch.equal(back.scores[t], r.scores[t])
    assert back.route(torch.tensor([[5.0, -1.0]], dtype=torch.float64)).tasks == ["b"]
    with pytest.raises(CheckpointError, match="sha256 differs"):
        Router.load(tmp_path / "router.safetensors", "0" * 64)
    save_adapters(tmp_path / "other.safetensors", {"x": torch.ones(2)}, {"format": "moe-cl"})
    with pytest.raises(CheckpointError, match="not a task router file"):
        Router.load(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        Router.load(tmp_path / "absent.safetensors")


def test_request_text_is_the_rows_own_text():
    assert request_text({"text": "A review.", "label": 3}) == "A review."
    assert request_text({"instruction": "Sum 2 and 3.", "text": "", "output": "5"}) == "Sum 2 and 3."
    assert request_text({"instruction": "Translate:", "text": "Bonjour", "output": "Hello"}) == "Translate:\n\nBonjour"


def test_features_are_the_frozen_bases_whatever_the_experts(tiny_base, smollm2_tokenizer):
    """Router features run the base alone: experts with large weights change nothing, and the pooled
    states are those of the base's first layers, averaged over every token but the prefix."""
    model = MoECLModel(tiny_base, ["agnews"], ExpertsConfig(rank=4))
    model.add_task("agnews")
    ids = request_ids(smollm2_tokenizer, ["A short text.", "Another, somewhat longer text to read."], 64)
    assert all(x[0] == smollm2_tokenizer.bos_token_id for x in ids) and len(ids[0]) < len(ids[1])
    strategy = LocalStrategy("cpu")
    before = gather_features(model, ids, 1, strategy, 2, smollm2_tokenizer.pad_token_id)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(0.5)
    after = gather_features(model, ids, 1, strategy, 1, smollm2_tokenizer.pad_token_id)
    torch.testing.assert_close(before, after, rtol=1e-6, atol=1e-6)  # batch of 2 (padded) or 1: the same
    decoder = tiny_base.get_decoder()
    model._route(None, None, collect=False, base_only=True)  # the plain forward below runs the base alone too
    with torch.no_grad():
        x = torch.tensor([ids[1]])
        states = decoder(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[1] is layer 0's output; the router adds the final norm and skips the prefix token
    expected = decoder.norm(states[1])[0, 1:].mean(dim=0).double()
    torch.testing.assert_close(after[1], expected, rtol=1e-5, atol=1e-6)


def test_the_router_arithmetic_runs_on_its_device():
    """Fitting, the shared precision and routing run in float64 on the router's device (a GPU rank's, not one
    host core per rank); the meta device stands in for a GPU. Statistics loaded from a file (on the host)
    join those computed there, and the file is written from the host."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g) + 2
    on_host = Router(layer=1).with_task("a", a)
    moved = Router(1, on_host.tasks, on_host.count, on_host.mean, on_host.var, on_host.scores, on_host.scatter,
                   on_host.pooled, device=torch.device("meta")).with_task("b", b)
    assert {t.device.type for t in (moved.scatter, moved.mean["b"], moved.var["b"], moved.scores["b"], moved.precision())} \
        == {"meta"}
    # the same arithmetic on the host gives what routing on the host gave before
    both = on_host.with_task("b", b)
    routes = both.route(torch.cat([a[:3], b[:3]]))
    assert routes.tasks == ["a"] * 3 + ["b"] * 3 and routes.confidence.device.type == "cpu"
