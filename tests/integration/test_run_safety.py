"""Opening someone else's run directory runs none of their code (issue 21, family 1): trainer_state.pt is read
with torch's weights-only unpickler (and not at all by eval), plug-ins / pkg:// search paths / trust_remote_code
named by a run are used only when the user's own command line names them, and a model that ships code is
refused with the fix instead of transformers' [y/N] prompt."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rredcot.errors import UserError
from tests.integration.conftest import cli


class _Opens:
    """Unpickling this opens (creates) a file: the marker that code from the checkpoint ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def shared_run(fast_run, tmp_path) -> Path:
    """A copy of a finished run, as if someone had sent it."""
    run = tmp_path / "theirs"
    shutil.copytree(fast_run, run)
    return run


def _said(proc) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def test_a_crafted_trainer_state_runs_nothing(shared_run, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = sorted((shared_run / "checkpoints").glob("step_*"))[-1]
    torch.save({"step": 4, "payload": _Opens(marker)}, ckpt / "trainer_state.pt")
    cli("eval", f"checkpoint={shared_run}", "logging.progress=false")  # weights only
    assert not marker.exists()
    proc = cli("train", "resume=true", f"run_dir={shared_run}", "train.steps=6", check=False)
    assert proc.returncode == 2 and "never unpickles" in _said(proc)
    assert not marker.exists()


def _plugin(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "imported"
    mod = tmp_path / "their_plugin.py"
    mod.write_text(f"open({str(marker)!r}, 'w').close()\n")
    return mod, marker


@pytest.mark.parametrize("where", ["config.yaml", "overrides.yaml"])
def test_plugins_named_by_a_run_are_imported_only_when_the_user_names_them(shared_run, tmp_path, where):
    mod, marker = _plugin(tmp_path)
    if where == "config.yaml":
        cfg = yaml.safe_load((shared_run / "config.yaml").read_text())
        cfg["plugins"] = [str(mod)]
        (shared_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    else:
        over = yaml.safe_load((shared_run / "overrides.yaml").read_text())
        (shared_run / "overrides.yaml").write_text(yaml.safe_dump([*over, f"plugins=[{mod}]"]))
    for command in (["eval", f"checkpoint={shared_run}"], ["credit", f"checkpoint={shared_run}"]):
        proc = cli(*command, check=False)
        assert proc.returncode == 2, _said(proc)
        assert "never runs code because a run directory names it" in _said(proc)
        assert f"'plugins=[{mod}]'" in _said(proc) and not marker.exists()
    proc = cli("train", "resume=true", f"run_dir={shared_run}", "train.steps=6", check=False)
    assert proc.returncode == 2 and not marker.exists()
    cli("eval", f"checkpoint={shared_run}", f"plugins=[{mod}]", "logging.progress=false")
    assert marker.exists() == (where == "config.yaml")  # the saved config is the run's truth: [] in overrides' case


def test_a_runs_trust_remote_code_is_not_taken(shared_run):
    cfg = yaml.safe_load((shared_run / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True
    (shared_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli("eval", f"checkpoint={shared_run}", check=False)
    assert proc.returncode == 2 and "model.trust_remote_code=true" in _said(proc)


def test_a_model_that_ships_code_is_refused_with_the_fix_not_prompted(hub_shaped_model, tmp_path):
    from rredcot.task.model import load_pretrained

    model = tmp_path / "custom"
    shutil.copytree(hub_shaped_model, model)
    marker = tmp_path / "model_code_ran"
    (model / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_custom.C", "AutoModelForCausalLM": "modeling_custom.M"}
    config["model_type"] = "custom_lm"  # unknown to transformers: only its own code could load it
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model.trust_remote_code=true"):
        load_pretrained(str(model))  # no stdin prompt: trust_remote_code=False is passed explicitly
    assert not marker.exists()
