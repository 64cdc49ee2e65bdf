import json
import math
import tomllib
from importlib import resources

import pytest

from tokenmill.errors import ConfigError
from tokenmill.plan.hardware import get_hardware, list_hardware, spec_from_dict
from tokenmill.plan.models import get_model, list_models

REQUIRED = {
    "h100", "h200", "b200", "a100", "l4", "mi300x", "groq-lpu", "cerebras-wse3",
    "sambanova-sn40l", "server-cpu", "this-machine",
}  # fmt: skip


def _figures(table, path=""):
    """Every { value, source } leaf of a catalogue file."""
    if isinstance(table, dict):
        if "value" in table:
            yield path, table
            return
        for key, val in table.items():
            yield from _figures(val, f"{path}.{key}")
    elif isinstance(table, list):
        for i, val in enumerate(table):
            yield from _figures(val, f"{path}[{i}]")


def test_catalogue_has_the_required_hardware():
    assert set(list_hardware()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_figure_has_a_source(name):
    folder = resources.files("tokenmill.plan").joinpath("catalogue")
    raw = tomllib.loads(folder.joinpath(f"{name}.toml").read_text())
    figures = list(_figures(raw))
    assert len(figures) >= 10
    for path, fig in figures:
        assert isinstance(fig["value"], int | float), path
        assert str(fig.get("source", "")).strip(), f"{name}{path} has no source"
    spec = get_hardware(name)
    assert spec.economics.hourly_cost_usd() >= 0
    assert spec.economics.power_w > 0
    assert (spec.profile.step_jitter_cv == 0) == spec.is_static or name == "this-machine"


def test_uncalibrated_this_machine_is_marked(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    spec = get_hardware("this-machine")
    assert spec.calibrated is False
    assert "uncalibrated" in spec.display_name


def test_aliases_and_unknown_hardware():
    assert get_hardware("groq").name == "groq-lpu"
    assert get_hardware("H100-SXM").name == "h100"
    with pytest.raises(ConfigError, match="unknown hardware 'tpu9'.*h100"):
        get_hardware("tpu9")


def test_figure_without_source_is_rejected():
    raw = {
        "name": "x",
        "memory": [{"name": "hbm", "capacity_gb": {"value": 1}, "bandwidth_gb_s": {"value": 1}}],
        "compute": {"bf16_tflops": {"value": 1, "source": "s"}},
    }
    with pytest.raises(ConfigError, match="source"):
        spec_from_dict(raw, "test")


def test_model_catalogue_and_config_path(tmp_path):
    assert {"llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-2-70b", "qwen2.5-7b",
            "qwen2.5-72b", "mistral-7b", "smollm2-135m"} <= set(list_models())  # fmt: skip
    for name in list_models():
        assert get_model(name).source.startswith("huggingface.co/")
    cfg = json.loads(
        resources.files("tokenmill.plan").joinpath("catalogue/mistral-7b.json").read_text()
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    entry = get_model(str(tmp_path))
    assert entry.arch.hidden_size == 4096 and math.isclose(entry.arch.rope_theta, 1e6)
    with pytest.raises(ConfigError, match="unknown model 'gpt-9'.*llama-3.1-8b"):
        get_model("gpt-9")


def test_a_gguf_path_is_a_model_like_tokenmill_serve_takes(tmp_path):
    from tokenmill.loader.default_model import default_model_path

    entry = get_model(str(default_model_path()))
    catalogue = get_model("smollm2-135m").arch
    assert entry.arch.hidden_size == catalogue.hidden_size
    assert entry.arch.num_hidden_layers == catalogue.num_hidden_layers
    assert entry.arch.num_key_value_heads == catalogue.num_key_value_heads
    not_a_model = tmp_path / "notes.gguf"
    not_a_model.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ConfigError, match="cannot read the GGUF model"):
        get_model(str(not_a_model))
