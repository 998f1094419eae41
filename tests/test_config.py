"""The configuration rejects typos and bad values, naming the key and where its value came from;
environment overrides take the key's type; `mirador config show` says where each value came from;
`miradord` refuses to start on a wrong key."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from click.testing import CliRunner

from mirador.client.cli import main as cli
from mirador.client.paths import Paths
from mirador.runtime.config import ConfigError, load, load_config

from .conftest import BIN, make_home


@pytest.fixture
def paths(tmp_path):
    p = Paths.from_env({"MIRADOR_HOME": str(tmp_path)})
    p.config.mkdir(parents=True)
    return p


def write(paths: Paths, name: str, text: str) -> str:
    (paths.config / name).write_text(text)
    return str(paths.config / name)


def error_of(paths: Paths, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(paths, env=env or {})
    return str(info.value)


@pytest.mark.parametrize("name, text, says", [
    ("mirador.toml", "[stages.quick]\nmax_token = 64\n", "stages.quick.max_token: unknown key; did you mean max_tokens?"),
    ("mirador.toml", "[memroy]\nenabled = false\n", "memroy: unknown key; did you mean memory?"),
    ("mirador.toml", "[memory]\nrecal_k = 2\n", "memory.recal_k: unknown key; did you mean recall_k?"),
    ("mirador.toml", "[preload]\nthreshhold = 0.3\n", "preload.threshhold: unknown key; did you mean threshold?"),
    ("mirador.toml", "[stages.deep]\nplacement = {resorces = {gpu = 1}}\n",
     "stages.deep.placement.resorces: unknown key; did you mean resources?"),
    ("mirador.toml", "[stages]\nordr = [\"quick\"]\n", "stages.ordr: unknown key; did you mean order?"),
    ("mirador.toml", "[energy.balanced]\nstage = [\"quick\"]\n", "energy.balanced.stage: unknown key; did you mean stages?"),
    ("mirador.toml", "[routing]\ncomplx = [\"quick\"]\n", "routing.complx: unknown key; did you mean complex?"),
    ("mirador.toml", "[chains.c]\nsteps = [{name = \"a\", model = \"smollm2-135m\", prompt = \"p\"},\n"
                     "  {name = \"b\", modle = \"smollm2-135m\", prompt = \"p\"}]\n",
     "chains.c.steps[1].modle: unknown key; did you mean model?"),
    ("models.toml", "[models.smollm2-135m]\nn_ctxx = 4096\n", "models.smollm2-135m.n_ctxx: unknown key; did you mean n_ctx?"),
    ("models.toml", "[models.llama3-2-1b]\nkeepalive = \"1m\"\n", "models.llama3-2-1b.keepalive: unknown key; did you mean keep_alive?"),
])
def test_an_unknown_key_names_its_path_the_nearest_valid_name_and_the_file(paths, name, text, says):
    file = write(paths, name, text)
    assert error_of(paths) == f"{says} (in {file})"


def test_an_unknown_key_with_nothing_close_lists_the_valid_ones(paths):
    write(paths, "mirador.toml", "[stages.deep]\nplacement = {node = \"x\"}\n")
    assert error_of(paths).startswith("stages.deep.placement.node: unknown key; valid: resources, labels")


def test_every_wrong_key_is_reported_at_once(paths):
    write(paths, "mirador.toml", "[memory]\nrecal_k = 2\nmin_similarity = 1.5\n[ray]\nnum_cpu = 2\n")
    lines = sorted(error_of(paths).splitlines())
    assert len(lines) == 3 and lines[1].startswith("memory.recal_k: unknown key") and lines[2].startswith("ray.num_cpu")
    assert lines[0].startswith("memory.min_similarity: must be less than or equal to 1, not 1.5")


@pytest.mark.parametrize("text, says", [
    ("[stages.quick]\ntemperature = -0.1", "stages.quick.temperature: must be greater than or equal to 0, not -0.1"),
    ("[stages.quick]\nmax_tokens = 0", "stages.quick.max_tokens: must be greater than 0, not 0"),
    ("[stages.quick]\nmax_tokens = 1.5", "stages.quick.max_tokens: must be a whole number, not 1.5"),
    ("[stages.quick]\nmax_tokens = true", "stages.quick.max_tokens: must be a number, not true/false"),
    ("[stages.quick]\nmax_tokens = \"many\"", "stages.quick.max_tokens: must be a whole number, not 'many'"),
    ("[stages.quick]\nconfidence_prior = 2", "stages.quick.confidence_prior: must be less than or equal to 1, not 2"),
    ("[stages.quick]\nmodels = []", "stages.quick.models: must not be empty"),
    ("[stages.quick]\nmemory = \"perhaps\"", "stages.quick.memory: must be true or false, not 'perhaps'"),
    ("[stages.fast]\nmax_tokens = 9", "stages.fast.models: missing: this key is required"),
    ("[preload]\nthreshold = 1.2", "preload.threshold: must be less than or equal to 1, not 1.2"),
    ("[preload]\nbudget_share = 0", "preload.budget_share: must be greater than 0, not 0"),
    ("[memory]\nmin_similarity = -1", "memory.min_similarity: must be greater than or equal to 0, not -1"),
    ("[memory]\nplacement = \"gpu\"", "memory.placement: must be a table, not 'gpu'"),
    ("[energy]\nlow_battery_percent = 120", "energy.low_battery_percent: must be less than or equal to 100, not 120"),
    ("[energy]\nsensor = \"upower\"", "energy.sensor: must be \"psutil\" or \"module:function\", not 'upower'"),
    ("[ray]\nactor_wait_s = 0", "ray.actor_wait_s: must be greater than 0, not 0"),
    ("[ray]\nnum_cpus = -2", "ray.num_cpus: must be greater than or equal to 0, not -2"),
    ("[daemon]\nlog_level = \"verbose\"", "daemon.log_level: must be one of debug, info, warning, error, critical, not 'verbose'"),
    ("[daemon]\nlog_level = \"debg\"", "did you mean debug?"),
    ("[daemon]\nlisten = \"tcp://0.0.0.0:99999\"", "daemon.listen: must be tcp://HOST:PORT with PORT in 1..65535"),
    ("[client]\nconnect = \"localhost:7755\"", "client.connect: must be tcp://HOST:PORT"),
    ("[chains.c]\nsteps = []", "chains.c.steps: must not be empty"),
])
def test_types_and_ranges_are_checked(paths, text, says):
    write(paths, "mirador.toml", text + "\n")
    assert says in error_of(paths)


@pytest.mark.parametrize("text, says", [
    ("[models.x]\nbackend = \"olama\"\nsource = \"x\"", "models.x.backend: must be one of llamacpp, ollama, not 'olama'; did you mean ollama?"),
    ("[models.x]\nsource = \"x\"", "models.x.backend: missing"),
    ("[models.x]\nbackend = \"ollama\"", "models.x.source: missing"),
    ("[models.x]\nbackend = \"ollama\"\nsource = \"x\"\nsize_mb = -5", "models.x.size_mb: must be greater than 0"),
    ("[models.x]\nbackend = \"ollama\"\nsource = \"x\"\nn_threads = 2", "models.x.n_threads: unknown key"),  # a llama.cpp option
    ("[models.x]\nbackend = \"ollama\"\nsource = \"x\"\nkeep_alive = [1]", "models.x.keep_alive: must be a number or a string"),
])
def test_model_entries_are_checked_per_backend(paths, text, says):
    write(paths, "models.toml", text + "\n")
    assert says in error_of(paths)


def test_references_between_keys_are_checked_with_suggestions(paths):
    write(paths, "mirador.toml", "[chains.c]\nsteps = [{name = \"a\", model = \"smollm2-13m\", prompt = \"p\"}]\n")
    assert "chains.c.steps[0].model: 'smollm2-13m' (step 'a') is not in models.toml; did you mean smollm2-135m?" in error_of(paths)
    write(paths, "mirador.toml", "[stages]\norder = [\"quick\", \"fats\"]\n")
    assert "stages.order names 'fats' but there is no [stages.fats] table" in error_of(paths)
    write(paths, "mirador.toml", "[stages.quick]\nmodels = [\"smolm2\"]\n")
    assert "did you mean smollm2-135m?" in error_of(paths)
    write(paths, "mirador.toml", "[energy.minimal]\nstages = [\"quik\"]\n")
    assert "energy.minimal.stages names unknown stages" in error_of(paths)


def test_a_stage_left_out_of_order_is_dropped_but_still_checked(paths):
    write(paths, "mirador.toml", "[stages]\norder = [\"quick\", \"synthesis\"]\n[stages.synthesis]\nneeds = [\"quick\"]\n"
                                 "[routing]\ncomplex = [\"quick\", \"synthesis\"]\n")
    assert list(load_config(paths, env={}).stages) == ["quick", "synthesis"]
    write(paths, "mirador.toml", "[stages]\norder = [\"quick\"]\n[stages.deep]\nmax_tokns = 5\n")
    assert error_of(paths).startswith("stages.deep.max_tokns: unknown key")


@pytest.mark.parametrize("text, value", [
    ("false", False), ("\"false\"", False), ("no", False), ("0", False), ("off", False), ("FALSE", False),
    ("true", True), ("yes", True), ("1", True),
])
def test_environment_switches_take_the_keys_type(paths, text, value):
    assert load_config(paths, env={"MIRADOR_MEMORY__ENABLED": text}).memory.enabled is value


def test_environment_values_are_converted_to_each_keys_type(paths):
    config = load_config(paths, env={
        "MIRADOR_STAGES__QUICK__MAX_TOKENS": "64", "MIRADOR_STAGES__QUICK__TEMPERATURE": "0.5",
        "MIRADOR_RAY__NAMESPACE": "123",  # a name that looks like a number stays a name
        "MIRADOR_STAGES__QUICK__MODELS": '["smollm2-135m", "llama3-2-1b"]',
        "MIRADOR_MODELS__LLAMA3-2-1B__KEEP_ALIVE": "-1",  # Ollama wants the number
        "MIRADOR_STAGES__DEEP__AFTER_FIRST_TOKEN_OF": "",  # empty: none
        "MIRADOR_HOME": "/elsewhere", "MIRADOR_POWER_PROFILE": "minimal",  # not config keys: no "__"
    })
    quick = config.stages["quick"]
    assert quick.max_tokens == 64 and quick.temperature == 0.5 and quick.models == ("smollm2-135m", "llama3-2-1b")
    assert config.ray_namespace == "123" and config.models["llama3-2-1b"].options["keep_alive"] == -1
    assert config.stages["deep"].after_first_token_of is None


@pytest.mark.parametrize("name, text, says", [
    ("MIRADOR_MEMORY__ENABLED", "maybe", "memory.enabled: must be true or false, not 'maybe'"),
    ("MIRADOR_STAGES__QUICK__MAX_TOKENS", "lots", "stages.quick.max_tokens: must be a whole number, not 'lots'"),
    ("MIRADOR_STAGES__QUICK__TEMPERATURE", "-1", "stages.quick.temperature: must be greater than or equal to 0, not '-1'"),
    ("MIRADOR_STAGES__QUICK__MAX_TOKEN", "64", "stages.quick.max_token: unknown key; did you mean max_tokens?"),
    ("MIRADOR_RAY__ACTOR_WAIT_S", "soon", "ray.actor_wait_s: must be a number, not 'soon'"),
    ("MIRADOR_PRELOAD", "x", None),  # no "__": not a config variable, nothing to say
])
def test_a_bad_environment_value_names_the_variable(paths, name, text, says):
    if says is None:
        load_config(paths, env={name: text})
        return
    assert error_of(paths, {name: text}) == f"{says} (from {name})"


def test_sources_of_values(paths):
    file = write(paths, "mirador.toml", "[stages.quick]\ntemperature = 0.9\n")
    loaded = load(paths, env={"MIRADOR_STAGES__QUICK__MAX_TOKENS": "64", "MIRADOR_STAGES__DEEP__PLACEMENT": "{labels = {zone = \"a\"}}"})
    assert loaded.source_of("stages.quick.temperature") == file
    assert loaded.source_of("stages.quick.max_tokens") == "MIRADOR_STAGES__QUICK__MAX_TOKENS"
    assert loaded.source_of("stages.deep.placement.labels.zone") == "MIRADOR_STAGES__DEEP__PLACEMENT"
    assert loaded.source_of("stages.quick.system_prompt") == "default"
    assert loaded.source_of("stages.quick.after_first_token_of") == "default"  # the schema's default


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """The environment `mirador` sees in-process: only this home, no stray MIRADOR_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith(("MIRADOR_", "XDG_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MIRADOR_HOME", str(tmp_path))
    paths = Paths.from_env({"MIRADOR_HOME": str(tmp_path)})
    paths.config.mkdir(parents=True)
    return paths


def test_config_show_prints_each_value_with_its_source(cli_env):
    file = write(cli_env, "mirador.toml", "[stages.quick]\ntemperature = 0.9\n")
    result = CliRunner().invoke(cli, ["config", "show"], env={"MIRADOR_STAGES__QUICK__MAX_TOKENS": "64"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "stages.quick.max_tokens = 64  # MIRADOR_STAGES__QUICK__MAX_TOKENS" in lines
    assert f"stages.quick.temperature = 0.9  # {file}" in lines
    assert "stages.deep.temperature = 0.5  # default" in lines
    assert 'stages.order = ["quick", "deep", "synthesis"]  # default' in lines
    assert 'models.smollm2-135m.backend = "llamacpp"  # default' in lines

    result = CliRunner().invoke(cli, ["config", "show", "--json"], env={"MIRADOR_MEMORY__ENABLED": "no"})
    shown = json.loads(result.output)
    assert shown["config"]["memory"]["enabled"] is False and shown["sources"]["memory.enabled"] == "MIRADOR_MEMORY__ENABLED"
    assert shown["config"]["stages"]["quick"]["temperature"] == 0.9 and shown["sources"]["stages.quick.temperature"] == file
    assert shown["sources"]["ray.actor_wait_s"] == "default"


def test_config_show_reports_a_wrong_key_and_exits_2(cli_env):
    write(cli_env, "mirador.toml", "[stages.quick]\nmax_token = 64\n")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 2
    assert "stages.quick.max_token: unknown key; did you mean max_tokens?" in result.output


@pytest.mark.parametrize("files, env, says", [
    ({"mirador.toml": "[stages.quick]\nmax_token = 64\n"}, {}, "stages.quick.max_token: unknown key; did you mean max_tokens?"),
    ({}, {"MIRADOR_RAY__ACTOR_WAIT_S": "soon"}, "ray.actor_wait_s: must be a number, not 'soon' (from MIRADOR_RAY__ACTOR_WAIT_S)"),
])
def test_miradord_refuses_to_start_on_a_wrong_key(files, env, says):
    home = make_home(files)
    try:
        started = time.monotonic()
        proc = subprocess.run([str(BIN / "miradord")], env={**home.env, **env}, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr and "Traceback" not in proc.stderr
        assert took < 30  # refused before Ray starts (a Ray start alone takes 3-6 s here, then actors)
        assert not (home.paths.runtime / "miradord.sock").exists() and not home.paths.logfile.exists()
    finally:
        shutil.rmtree(home.root, ignore_errors=True)
