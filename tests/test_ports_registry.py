"""The port registry: built-in names, run-time registration and third-party entry points."""

from importlib.metadata import EntryPoint

import pytest

import audiolens_ct as act
from audiolens_ct import ports
from audiolens_ct.errors import PortError
from audiolens_ct.ports import available_ports, get_port
from model_ports.qwen2_audio import Qwen2AudioPort


class RenamedPort(Qwen2AudioPort):
    name = "renamed-qwen2-audio"
    architectures = ("RenamedArch",)


def test_builtin_ports_resolve_by_name():
    assert {"qwen2-audio", "voxtral", "qwen-audio", "desta2", "desta2.5"} <= set(available_ports())
    assert get_port("qwen2-audio").sampling_rate == 16000


def test_register_port_at_run_time():
    port = act.register_port(RenamedPort)
    assert get_port("renamed-qwen2-audio") is port
    assert ports.port_for_config({"architectures": ["RenamedArch"]}, "cfg") is port


def test_third_party_port_found_through_entry_point(monkeypatch):
    fake = EntryPoint(name="third-party", value="model_ports.qwen2_audio:Qwen2AudioPort", group=ports.ENTRY_POINT_GROUP)
    monkeypatch.setattr(ports, "entry_points", lambda group: [fake] if group == ports.ENTRY_POINT_GROUP else [])
    assert "third-party" in available_ports()
    assert isinstance(get_port("third-party"), Qwen2AudioPort)


def test_unknown_names_and_configs_fail_with_the_available_list():
    with pytest.raises(PortError, match="available ports: .*qwen2-audio"):
        get_port("no-such-port")
    with pytest.raises(PortError, match="my/ckpt: no port recognises architecture \\['LlavaForCausalLM'\\]") as err:
        ports.port_for_config({"architectures": ["LlavaForCausalLM"]}, "my/ckpt")
    assert "qwen2-audio (e.g. Qwen/Qwen2-Audio-7B-Instruct, Qwen/Qwen2-Audio-7B)" in str(err.value)


def test_a_port_without_a_transcript_adds_nothing_to_the_twin_or_the_record():
    port = get_port("qwen2-audio")
    assert not port.reads_transcript
    assert port.twin_kwargs({}, "corrupted") == {} and port.input_record({}) == {}
