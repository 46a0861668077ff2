"""Configs: YAML + dotted overrides, and errors that name the key."""

import pytest

from pipelines.config import ConfigError, load_config, parse_overrides
from pipelines.generate import GenerationConfig


def test_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("sampling:\n  n: 4\n  temperature: 0.5\nsynthetic:\n  max_steps: 3\n")
    cfg = load_config(GenerationConfig, y, ["sampling.temperature=0.9", "engine.model=tiny", "greedy=false",
                                            "synthetic.ops=+,-"])
    assert cfg.sampling.n == 4 and cfg.sampling.temperature == 0.9
    assert cfg.engine.model == "tiny" and cfg.greedy is False
    assert cfg.synthetic.max_steps == 3 and cfg.synthetic.ops == ("+", "-")
    assert cfg.prompt.format == "lines"  # untouched default


@pytest.mark.parametrize("override, msg", [
    (["sampling.temprature=0.5"], "unknown config key sampling.temprature"),
    (["temperature=0.5"], "unknown config key temperature;.*did you mean sampling.temperature"),
    (["sampling.n=many"], "sampling.n: expected an integer"),
    (["greedy=maybe"], "greedy: expected true or false"),
    (["sampling.n=0"], "n >= 1"),
    (["prompt.format=poem"], "format 'poem'"),
    (["engine.min_engines=3", "engine.max_engines=2"], "min_engines"),
    (["nonsense"], "expected key=value"),
    (["synthetic.max_steps=9"], "max_steps"),
    (["graders=0"], "graders must be >= 1, got 0"),
])
def test_bad_keys_and_values_are_named(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(GenerationConfig, None, override)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GenerationConfig, tmp_path / "none.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(GenerationConfig, bad)


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=0.5", "d=true", "e=hello", "f="]) == {
        "a": {"b": 1, "c": 0.5}, "d": True, "e": "hello", "f": ""}


def test_a_partial_section_keeps_the_fields_own_default_and_may_be_dotted_overrides():
    from dataclasses import dataclass

    from pipelines.config import help_field
    from pipelines.problems import SyntheticConfig

    @dataclass(frozen=True)
    class Outer:
        problems: SyntheticConfig = help_field(SyntheticConfig(n=7, max_steps=1), "")

    # the field's default (n=7, max_steps=1), not SyntheticConfig's own (n=200), fills what is left out
    got = load_config(Outer, overrides=["problems.seed=3"]).problems
    assert (got.n, got.max_steps, got.seed) == (7, 1, 3)
    assert load_config(Outer, base={"problems": ["seed=3", "n=9"]}).problems == SyntheticConfig(n=9, seed=3,
                                                                                                 max_steps=1)
    with pytest.raises(ConfigError, match="unknown config key problems.sed"):
        load_config(Outer, base={"problems": ["sed=3"]})


def test_a_dotted_override_changes_one_key_of_a_section_written_as_overrides(tmp_path):
    """iterate_tiny.yaml writes stage sections as lists of dotted overrides; a command-line override of one key of
    such a section keeps the others (it replaced the whole section before)."""
    from pipelines.iterate import IterateConfig

    cfg_file = tmp_path / "loop.yaml"
    cfg_file.write_text("annotate: [rollouts=2, max_tokens=8]\nevaluate: {strategies: [greedy, majority]}\n")
    cfg = load_config(IterateConfig, cfg_file, ["annotate.labels=step_check", "annotate=[method=binary]"])
    assert (cfg.annotate.rollouts, cfg.annotate.max_tokens) == (2, 8)
    assert cfg.annotate.labels == "step_check" and cfg.annotate.method == "binary"
    assert list(cfg.evaluate.strategies) == ["greedy", "majority"]  # a plain list value is not a section
