"""logging.report_to: TRL's tracker names, the deprecated booleans, and a missing package refused with its fix."""

import importlib.util

import pytest

from rredcot.compose import load_config
from rredcot.errors import UserError
from rredcot.trackers import check_installed, report_to

from ..integration.conftest import run_main


def test_report_to_takes_trls_names_and_the_old_booleans_with_a_note(capsys):
    assert report_to(load_config(["logging.report_to=[wandb,trackio]"], check_entries=False)) == ["wandb", "trackio"]
    assert report_to(load_config(["logging.report_to=[none]"], check_entries=False)) == []
    cfg = load_config(
        ["logging.tensorboard=true", "logging.report_to=[wandb]", "logging.wandb_project=mine"], check_entries=False
    )
    assert report_to(cfg, say=True) == ["wandb", "tensorboard"]
    err = " ".join(capsys.readouterr().err.split())
    assert "logging.tensorboard=true is deprecated" in err and "it is logging.project now (project 'mine')" in err


def test_an_unknown_tracker_is_refused_with_the_names():
    with pytest.raises(UserError, match="logging.report_to.*one of tensorboard, wandb, trackio"):
        load_config(["logging.report_to=[mlflow]"], check_entries=False)


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "trackio"])
def test_a_missing_package_names_the_pip_install(name, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    with pytest.raises(UserError, match=f"needs the {name} package.*pip install {name}"):
        check_installed(load_config([f"logging.report_to=[{name}]"], check_entries=False))


def test_the_cli_refuses_a_missing_tracker_before_any_work(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    code, err = run_main("train debug=fast logging.report_to=[wandb] run_dir={d}", d=tmp_path / "run")
    assert code == 2 and "pip install wandb" in " ".join(err.split()) and not (tmp_path / "run").exists()
