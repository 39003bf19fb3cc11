"""The verdict policy file: defaults without a file, overrides, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.verdict.policy import CRITERIA, Policy


def test_defaults_work_without_a_file() -> None:
    p = Policy.load("").for_challenger("anyone")
    assert [g.name for g in p.guardrails] == list(CRITERIA)
    assert p.guardrail("error").margin == 0.01 and not p.guardrail("error").relative
    assert p.guardrail("abs_error").relative
    assert not p.declared and p.success is None
    assert (p.gates.completeness, p.gates.min_pairs, p.gates.min_discordant,
            p.gates.min_duration_s, p.gates.maturity_quantile) == (0.99, 1000, 10, 86400, 0.99)
    assert p.alpha == 0.05


def test_challenger_overrides_merge_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("""
[defaults]
alpha = 0.1
success = {criterion = "error", min_improvement = 0.005}
[defaults.guardrails]
error = {margin = 0.02}
abs_error = {margin = 0.1, relative = true, cap = 40}
[defaults.gates]
min_duration = "12h"
[defaults.limits]
allowed_labels = ["yes", "no"]
value_range = [0, 100]
[defaults.cost]
default = 2.0
matrix = {yes = {no = 5.0}, no = {yes = 50.0}}
[challenger."gbm-v2".guardrails.error]
margin = 0.03
[challenger."gbm-v2".gates]
min_pairs = 200
""")
    policy = Policy.from_settings(Settings.load(env={"SHADOWPIPE_POLICY": str(path)}))
    base, gbm = policy.for_challenger("other"), policy.for_challenger("gbm-v2")
    assert base.declared and [g.name for g in base.guardrails] == ["error", "abs_error"]
    assert base.guardrail("error").margin == 0.02 and gbm.guardrail("error").margin == 0.03
    assert gbm.guardrail("abs_error").margin == 0.1 and gbm.abs_error_cap == 40.0
    assert gbm.alpha == 0.1 and gbm.gates.min_pairs == 200 and base.gates.min_pairs == 1000
    assert gbm.gates.min_duration_s == 12 * 3600
    assert base.success is not None and base.success.min_improvement == 0.005
    assert base.limits.allowed_labels == ("yes", "no") and base.limits.value_range == (0, 100)
    assert dict(((p, t), c) for p, t, c in base.cost_matrix) == {("no", "yes"): 50.0,
                                                                  ("yes", "no"): 5.0}
    assert base.cost_range() == (0.0, 50.0)
    assert base.hash != gbm.hash  # each challenger's REJECT un-latches on its own policy


def test_disabled_guardrail_is_left_out() -> None:
    p = Policy.parse("[defaults.guardrails]\nerror = {}\nbrier = {enabled = false}")
    assert [g.name for g in p.for_challenger("c").guardrails] == ["error"]


@pytest.mark.parametrize(("text", "message"), [
    ("[defaults.guardrails.error]\nmargn = 0.01",
     "[defaults.guardrails.error] unknown key 'margn'"),
    ("[defaults]\nalpah = 0.05", "[defaults] unknown key 'alpah'"),
    ("colour = 1", "unknown key 'colour'"),
    ("[defaults.guardrails]\naccuracy = {margin = 0.01}",
     "[defaults.guardrails] unknown key 'accuracy'"),
    ("[defaults]\nalpha = 0", "[defaults] alpha: 0 is below or at 0.0"),
    ("[defaults]\nalpha = 'high'", "[defaults] alpha: 'high' is not a number"),
    ("[defaults.gates]\nmin_pairs = 1.5", "[defaults.gates] min_pairs: 1.5 is not an integer"),
    ("[defaults.gates]\nmin_duration = 'a day'",
     "[defaults.gates] min_duration: 'a day' is not a duration"),
    ("[defaults.gates]\ncompleteness = 1.5", "[defaults.gates] completeness: 1.5 is above 1.0"),
    ('[challenger."x".guardrails.error]\nmargin = -1',
     '[challenger."x".guardrails.error] margin: -1 is below 0.0'),
    ("[defaults.limits]\nvalue_range = [5, 1]",
     "[defaults.limits] value_range: [5, 1] is not [low, high]"),
    ("[defaults.limits]\nallowed_labels = 'yes'",
     "[defaults.limits] allowed_labels: 'yes' is not a non-empty list"),
    ("[defaults]\nsuccess = 'accuracy'", "[defaults] success: 'accuracy' is not one of"),
    ("[defaults.guardrails]\ncost = {margin = 0.1}", "cost needs a [defaults.cost] matrix"),
    ("[defaults.guardrails.error]\nrelative = 'yes'",
     "[defaults.guardrails.error] relative: 'yes' is not true or false"),
    ("[defaults.cost.matrix.yes]\nno = 'x'", "[defaults.cost.matrix.yes] no: 'x' is not a number"),
    ("[defaults", "not valid TOML"),
])
def test_bad_policy_is_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Policy.parse(text)
    line = str(err.value)
    assert err.value.setting == "SHADOWPIPE_POLICY"
    assert "\n" not in line and message in line, line


def test_missing_policy_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^SHADOWPIPE_POLICY: cannot read .*nope\.toml"):
        Policy.load(tmp_path / "nope.toml")


def test_the_documented_policy_example_is_valid() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "verdict.md").read_text()
    example = doc.split("## Policy", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    policy = Policy.parse(example)
    gbm = policy.for_challenger("gbm-v2")
    assert gbm.guardrail("error").margin == 0.02 and gbm.guardrail("brier").margin == 0.01
    assert gbm.limits.allowed_labels == ("benign", "malignant") and gbm.cost_matrix
