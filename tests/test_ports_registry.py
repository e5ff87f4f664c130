"""The port registry: built-in names, run-time registration and third-party entry points."""

from importlib.metadata import EntryPoint

import pytest

import audiolens_ct as act
from audiolens_ct import ports
from model_ports.qwen2_audio import Qwen2AudioPort


class RenamedPort(Qwen2AudioPort):
    name = "renamed-qwen2-audio"
    architectures = ("RenamedArch",)


def test_builtin_ports_resolve_by_name():
    assert {"qwen2-audio", "voxtral", "qwen-audio", "desta2", "desta2.5"} <= set(act.available_ports())
    assert act.get_port("qwen2-audio").sampling_rate == 16000


def test_register_port_at_run_time():
    port = act.register_port(RenamedPort)
    assert act.get_port("renamed-qwen2-audio") is port
    assert ports.port_for_config({"architectures": ["RenamedArch"]}, "cfg") is port


def test_third_party_port_found_through_entry_point(monkeypatch):
    fake = EntryPoint(name="third-party", value="model_ports.qwen2_audio:Qwen2AudioPort", group=ports.ENTRY_POINT_GROUP)
    monkeypatch.setattr(ports, "entry_points", lambda group: [fake] if group == ports.ENTRY_POINT_GROUP else [])
    assert "third-party" in act.available_ports()
    assert isinstance(act.get_port("third-party"), Qwen2AudioPort)


def test_unknown_names_and_configs_fail_with_the_available_list():
    with pytest.raises(act.PortError, match="available ports: .*qwen2-audio"):
        act.get_port("no-such-port")
    with pytest.raises(act.PortError, match="my/ckpt: no port recognises architecture \\['LlavaForCausalLM'\\]"):
        ports.port_for_config({"architectures": ["LlavaForCausalLM"]}, "my/ckpt")


def test_to_str_tokens_accepts_inputs_tensors_and_strings(qwen2_audio_model):
    from audiolens_ct.testing import tone

    model = qwen2_audio_model
    inp = model.prepare(tone(0.5), "Hi?", "It is")
    assert model.to_str_tokens(inp) == inp.str_tokens[0]
    assert model.to_str_tokens(inp.tokens[0, -3:]) == inp.str_tokens[0][-3:]
    assert "".join(model.to_str_tokens(" female")) == " female"
