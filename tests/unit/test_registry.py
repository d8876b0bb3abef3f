"""Registries: names per stage, clear errors for unknown names, duplicates refused."""

import pytest

from rredcot import registry
from rredcot.errors import UserError


def test_every_stage_has_its_entries():
    assert registry.names("segment") == ["entropy", "fixed", "hybrid", "keyword", "newline", "none"]
    assert registry.names("redistribute") == [
        "attention",
        "gradient",
        "mc",
        "reference",
        "rredcot",
        "uniform",
        "verdict",
        "vps",
    ]
    assert registry.names("loss") == [  # chosen by update.loss_type: TRL 1.16's loss types
        "bnpo",
        "cispo",
        "dapo",
        "dr_grpo",
        "grpo",
        "luspo",
        "sapo",
        "vespo",
    ]
    assert {"builtin", "gsm8k", "math", "format"} <= set(registry.names("verify"))
    assert registry.names("task") == ["builtin", "hf", "search"]
    assert registry.names("rollout") == ["sample", "vllm"]


def test_unknown_name_lists_the_valid_ones_and_the_closest():
    with pytest.raises(UserError) as e:
        registry.get("segment", "fixd")
    msg = str(e.value)
    assert "Did you mean 'fixed'" in msg and "fixed, hybrid" in msg and "segment.name" in msg


def test_duplicate_registration_raises():
    with pytest.raises(KeyError, match="registered twice"):
        registry.register("segment", "fixed")(lambda t: [0])


def test_unknown_stage():
    with pytest.raises(UserError, match="Stages are"):
        registry.names("nope")


def test_builtin_manifest_is_what_the_modules_register():
    # `rredcot list` answers from BUILTIN without importing torch; importing the modules must agree with it.
    import importlib

    for stage, entries in registry.BUILTIN.items():
        for module in set(entries.values()):
            importlib.import_module(module)
        assert set(registry._REGISTRY[stage]) >= set(entries), stage
        assert {n for n, obj in registry._REGISTRY[stage].items() if obj.__module__.startswith("rredcot.")} == set(
            entries
        )


def test_plugin_file_registers_an_entry(tmp_path):
    plugin = tmp_path / "my_segmenter.py"
    plugin.write_text(
        "from rredcot.registry import register\n"
        "@register('segment', 'halves')\n"
        "def halves(trace):\n    return [0, trace.end // 2, trace.end]\n"
    )
    registry.load_plugins([str(plugin)])
    assert "halves" in registry.names("segment") and registry.get("segment", "halves").__name__ == "halves"


def test_missing_plugin_is_a_user_error():
    with pytest.raises(UserError, match="could not be imported"):
        registry.load_plugins(["no_such_rredcot_plugin_module"])
    with pytest.raises(UserError, match="does not exist"):
        registry.load_plugins(["/nonexistent/plugin.py"])


def test_a_plugin_cannot_take_a_builtin_name(tmp_path):
    plugin = tmp_path / "clash.py"
    plugin.write_text(
        "from rredcot.registry import register\n@register('segment', 'fixed')\ndef f(trace):\n    return [0]\n"
    )
    with pytest.raises(UserError, match="registered twice"):
        registry.load_plugins([str(plugin)])


def test_credit_estimator_variants_parse_and_bad_options_are_named():
    from rredcot.checks import validate
    from rredcot.compose import load_config
    from rredcot.estimator_spec import estimator_spec

    assert estimator_spec("rredcot:self_normalize=true,mode=anchored") == (
        "rredcot",
        {"self_normalize": True, "mode": "anchored"},
    )
    assert estimator_spec("uniform") == ("uniform", {})
    # commas inside brackets and quotes belong to the value
    assert estimator_spec('rredcot:extra_forcings=[["so x=", "\\n"]],mc_boundaries=2') == (
        "rredcot",
        {"extra_forcings": [["so x=", "\n"]], "mc_boundaries": 2},
    )
    assert estimator_spec("verdict:verdict_text='a, b? '") == ("verdict", {"verdict_text": "a, b? "})
    # on a command line: "credit.estimators=['rredcot:include_reference=false',uniform]" (quoted: it holds '=')
    validate(load_config(["credit.estimators=['rredcot:include_reference=false',uniform]"]))
    with pytest.raises(UserError, match="self_normalise is not an option of redistribute 'rredcot'"):
        validate(load_config(["credit.estimators=['rredcot:self_normalise=true']"]))
    with pytest.raises(UserError, match="name:key=value"):
        estimator_spec("rredcot:self_normalize")


def test_entries_declare_their_contract_at_registration():
    # what the trainer and the config checks read comes from the Entry, never from attributes on the function
    assert registry.entry("redistribute", "gradient").runs_backward
    assert not registry.entry("redistribute", "rredcot").runs_backward
    assert registry.entry("redistribute", "rredcot").needs_task_keys == ("forcing_text",)
    assert (
        registry.entry("redistribute", "uniform").title == "grpo" and registry.entry("redistribute", "mc").title == "mc"
    )
    assert not registry.entry("loss", "dapo").divide_by_accum and registry.entry("loss", "grpo").divide_by_accum
    assert registry.entry("task", "builtin").warmstart is not None and registry.entry("task", "hf").warmstart is None
    assert registry.entry("task", "search").check is not None
    assert "chunk_size" in registry.entry("rollout", "sample").rules
    for stage in registry.STAGES:
        for name in registry.names(stage):
            obj = registry.get(stage, name)
            stuck = {
                "option_rules",
                "check_options",
                "needs_task_keys",
                "runs_backward",
                "warmstart_samples",
                "divide_by_accum",
            } & set(vars(obj))
            assert not stuck, f"{stage} {name}: {stuck}"


def test_an_unknown_contract_field_is_refused_at_registration():
    with pytest.raises(TypeError, match="unknown contract field"):
        registry.register("segment", "halves2", needs_gpu=True)


def test_a_plugin_written_for_the_old_registry_is_told_how_to_declare_its_contract():
    # setting runs_backward on the function after registering would be silently ignored (FSDP would not refuse it)
    def halves(ro, ver, seg, ctx, *, group_size):
        return None

    registry.register("redistribute", "old_style_attr")(halves)
    halves.runs_backward = True
    with pytest.raises(UserError, match=r"declare it in the registration.*runs_backward=\.\.\."):
        registry.entry("redistribute", "old_style_attr")
    with pytest.raises(KeyError, match="stage 'loss' now"):
        registry.register("update", "my_loss")
    del registry._REGISTRY["redistribute"]["old_style_attr"]
