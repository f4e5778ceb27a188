"""Run-config validation and the presets shipped with the app."""

import tomllib
from pathlib import Path

import pytest
import torch

from common.protocol.config import ConfigError, RunConfig, describe_device, parse_run_config, resolve_device

ROOT = Path(__file__).resolve().parent.parent


def app_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_valid_and_list_every_key():
    cfg = parse_run_config(app_config())
    assert set(app_config()) == set(RunConfig().as_dict())  # --run-config can only override listed keys
    assert cfg.strategy == "fedmef" and cfg.resolved_norm == "nsconv" and cfg.sap_on and cfg.bae_on


@pytest.mark.parametrize("preset", sorted((ROOT / "conf").glob("*.toml")), ids=lambda p: p.name)
def test_presets_override_known_keys_with_valid_values(preset):
    overrides = tomllib.loads(preset.read_text())
    assert set(overrides) <= set(app_config())
    parse_run_config({**app_config(), **overrides})


def test_method_defaults_and_ablation_switches():
    base = app_config()
    tiny = parse_run_config({**base, "strategy": "fedtiny"})
    assert (tiny.resolved_norm, tiny.sap_on, tiny.bae_on) == ("batchnorm", False, False)
    ablation = parse_run_config({**base, "strategy": "fedmef", "bae": "off", "sap": "off", "norm": "none"})
    assert (ablation.resolved_norm, ablation.act_sparsity, ablation.bae_on) == ("none", None, False)
    assert parse_run_config({**base, "strategy": "fedavg"}).param_sparsity == 0.0


def test_every_problem_is_reported_at_once_with_a_hint():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"stratgy": "fedmef", "lr": "fast", "s-tm": 1.5, "batch-size": 0})
    text = str(err.value)
    assert "did you mean 'strategy'" in text and "lr must be a float" in text
    # range errors are checked once the types are right
    with pytest.raises(ConfigError) as err:
        parse_run_config({"s-tm": 1.5, "batch-size": 0, "strategy": "fedx", "sap": "maybe"})
    text = str(err.value)
    for fragment in ("s-tm = 1.5", "batch-size = 0", "'fedx'", "'maybe'"):
        assert fragment in text


@pytest.mark.parametrize(
    "bad",
    [
        {"bae": "on", "strategy": "feddst"},
        {"dataset": "cinic10"},
        {"feddip-s0": 0.95, "strategy": "feddip"},
        {"lr-decay": 0.0},
        {"batch-size": True},
        {"adjust-alpha": 0.6},
        {"bae-step": "momentum"},
        {"prune-centre": "median"},
        {"prune-centre": "filter-mean", "strategy": "fedtiny"},  # BatchNorm: no filter standardisation
    ],
)
def test_inconsistent_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        parse_run_config(bad)


def test_ints_are_accepted_for_floats():
    assert parse_run_config({"lr": 1}).lr == 1.0


def test_run_config_defaults_are_the_apps_defaults():
    # one set of defaults: a caller passing a partial mapping gets exactly what `flwr run` would
    assert RunConfig().as_dict() == app_config()


def test_device_is_auto_cpu_or_cuda():
    assert parse_run_config({}).device == "auto"
    with pytest.raises(ConfigError, match="device = 'gpu': choose one of auto, cpu, cuda"):
        parse_run_config({"device": "gpu"})
    with pytest.raises(ConfigError, match="choose one of auto, cpu, cuda"):
        resolve_device("cuda:1")


def test_auto_is_this_machines_cuda_device_or_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu") and describe_device(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("cuda_build", [None, "12.4"], ids=["cpu-build", "cuda-build"])
def test_cuda_without_a_cuda_device_says_what_to_do(monkeypatch, cuda_build):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray gives a simulated client without a GPU share
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    text = str(err.value)
    assert "set device = 'auto'" in text and "make TORCH=cuda" in text and "--gpus-per-client" in text
    assert ("CPU-only build" in text) == (cuda_build is None)
    assert ("CUDA_VISIBLE_DEVICES=''" in text) == (cuda_build is not None)


def test_cuda_is_chosen_where_torch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
