from __future__ import annotations

import pytest

from trainer.config import ConfigError, dump_yaml, from_dict, load_config, to_dict

from .conftest import REPO, run_cli


def test_shipped_configs_load():
    for name in ("tiny.yaml", "demo.yaml", "mtl5_7b.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.data.order and cfg.model.path


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["train.lr=1e-4", "data.order=[yelp,agnews]", "experts.gate=per_task",
                       "data.max_train_examples=null", "eval.val=false", "data.instructions.yelp=Rate it."])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.order == ["yelp", "agnews"]
    assert cfg.experts.gate == "per_task"
    assert cfg.data.max_train_examples is None
    assert cfg.eval.val is False
    assert cfg.data.instructions == {"yelp": "Rate it."}


def test_comma_list_override():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.order=agnews,yelp,amazon"])
    assert cfg.data.order == ["agnews", "yelp", "amazon"]


def test_all_problems_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: builtin:tiny-llama\n  dtpye: float32\n"
                   "train:\n  lr: fast\n  micro_batch_size: 0\n"
                   "experts:\n  gate: sometimes\n"
                   "data:\n  order: [a, a]\n"
                   "extra: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert str(bad) in msg
    assert "model.dtpye: unknown key (did you mean 'dtype'?)" in msg
    assert "train.lr: expected float, got 'fast'" in msg
    assert "experts.gate: expected one of 'shared', 'per_task', got 'sometimes'" in msg
    assert "extra: unknown key" in msg
    # Cross-field checks run once the types are right:
    bad.write_text("model:\n  path: x\ndata:\n  order: [a, a, shared]\ntrain:\n  micro_batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "task 'a' is listed twice" in msg
    assert "reserved for the shared expert" in msg
    assert "train.micro_batch_size: must be > 0, got 0" in msg


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected int, got True"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.epochs=true"])


def test_round_trip_through_dict_and_yaml():
    import yaml

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.lr=3e-4"])
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_overrides_may_also_follow_the_options(tmp_path, model_cache):
    from .conftest import run_cli

    out = run_cli("submit", "configs/tiny.yaml", "--dry-run", "slurm.nodes=3", "train.global_batch_size=24", f"run.dir={tmp_path}",
                  f"model.cache_dir={model_cache}").stdout
    assert out.count("--nodes=3") == 2  # one job per stage, both with the override
    proc = run_cli("submit", "configs/tiny.yaml", "--dry-run", "--bogus", check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_activation_checkpointing_is_a_typed_train_option():
    tiny = REPO / "configs" / "tiny.yaml"
    assert load_config(tiny).train.activation_checkpointing is False
    assert load_config(tiny, ["train.activation_checkpointing=true"]).train.activation_checkpointing is True
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing: expected bool, got 2"):
        load_config(tiny, ["train.activation_checkpointing=2"])


def test_global_batch_size_fixes_the_optimizer_step_whatever_the_ranks():
    cfg = load_config(REPO / "configs" / "mtl5_7b.yaml", ["train.global_batch_size=32", "train.micro_batch_size=2"])
    assert [cfg.train.accumulation(w) for w in (1, 2, 8, 16)] == [16, 8, 2, 1]
    assert {cfg.train.global_batch(w) for w in (1, 2, 8, 16)} == {32}
    with pytest.raises(ConfigError, match=r"32 rows per optimizer step cannot be split over 32 rank\(s\) x "
                                          r"train.micro_batch_size 2 = 64 rows per pass; set train.micro_batch_size to 1"):
        cfg.train.accumulation(32)
    with pytest.raises(ConfigError, match=r"make train.global_batch_size a multiple of 3 ranks"):
        cfg.train.accumulation(3)
    # Without it, the old meaning: micro x grad_accum x ranks, growing with the ranks.
    legacy = load_config(REPO / "configs" / "mtl5_7b.yaml", ["train.global_batch_size=null", "train.grad_accum=3"])
    assert [legacy.train.global_batch(w) for w in (1, 4)] == [6, 24]


def test_global_batch_size_and_grad_accum_conflicts_are_config_errors():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", ["train.grad_accum=2", "train.min_steps=-1"])
    assert "train.grad_accum: leave it out when train.global_batch_size is set" in str(e.value)
    assert "train.min_steps: must be >= 0" in str(e.value)
    with pytest.raises(ConfigError, match="train.global_batch_size: 10 is not a multiple of train.micro_batch_size 4"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.global_batch_size=10"])


def test_config_verb_lists_every_field_and_prints_the_resolved_config(tmp_path):
    import dataclasses

    from trainer.config import Config

    ref = run_cli("config").stdout
    sections = [f for f in dataclasses.fields(Config)]
    for sec in sections:
        for f in dataclasses.fields(sec.default_factory()):
            assert f"  {sec.name}.{f.name}: " in ref, f"{sec.name}.{f.name} missing from `config`"
    assert "  train.global_batch_size: int or null = null\n      Rows per optimizer step over all ranks." in ref
    assert "  data.tasks.<task>.label: str or null = null" in ref
    # every field documented: a field line is followed by its indented docstring
    lines = ref.splitlines()
    bare = [a for a, b in zip(lines, lines[1:] + [""]) if a.startswith("  ") and not a.startswith("    ")
            and not b.startswith("      ")]
    assert not bare, f"fields without a docstring: {bare}"
    resolved = run_cli("config", "configs/tiny.yaml", "train.lr=1e-4").stdout
    again = tmp_path / "resolved.yaml"
    again.write_text(resolved)
    assert to_dict(load_config(again)) == to_dict(load_config(REPO / "configs" / "tiny.yaml", ["train.lr=1e-4"]))
    bad = run_cli("config", "configs/tiny.yaml", "train.lr=fast", check=False)
    assert bad.returncode == 2 and "train.lr: expected float, got 'fast'" in bad.stderr


def test_every_argument_of_every_verb_has_help():
    import argparse

    from trainer.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{verb} {a.dest}" for verb, sp in verbs.choices.items() for a in sp._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    assert set(verbs.choices) == {"config", "sequence", "stage", "evaluate", "plan", "submit", "report", "extract", "merge",
                                  "export", "predict", "inspect"}


def test_issue14_settings_are_checked_together():
    """Settings that only make sense together: each mistake named with what to change."""
    tiny = REPO / "configs" / "tiny.yaml"
    cases = [(["data.options=false"], "data.options: false lists no options"),  # tiny answers with letters
             (["eval.other_rows=0"], "eval.other_rows: must be > 0 or null"),
             (["eval.other_rows=10", "eval.task_id=inferred"], "set eval.other_rows to null"),
             (["experts.discriminator_extra=memory", "experts.method=per_task_lora"], "needs the discriminators of method moe_cl"),
             (["experts.discriminator_extra=noise", "data.order=[agnews,noise]"], "rename that task"),
             (["experts.memory_rows=0"], "experts.memory_rows / memory_batch: must be >= 1")]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(tiny, overrides)
        assert message in str(e.value), (overrides, str(e.value))
    ok = load_config(tiny, ["data.options=false", "data.answer=label", "eval.other_rows=4",
                            "experts.discriminator_extra=memory", "experts.method=moe_cl"])
    assert ok.data.options is False and ok.eval.other_rows == 4
