"""`jaxserve serve` flags: every EngineConfig field and every ServerOptions field, parsed."""

from __future__ import annotations

import dataclasses

import pytest

from jaxserve.cli import build_parser, engine_config_from_args
from jaxserve.config import EngineConfig
from server.app import ServerOptions
from server.cli import server_options_from_args


def test_every_engine_and_server_option_is_a_serve_flag():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    for cls in (EngineConfig, ServerOptions):
        for field in dataclasses.fields(cls):
            assert "--" + field.name.replace("_", "-") in flags, field.name


def test_serve_flags_reach_the_configs():
    args = build_parser().parse_args(["serve", "--port", "0", "--api-key", "k", "--stream-interval", "4",
                                      "--max-model-len", "auto", "--no-enable-prefix-caching",
                                      "--max-waiting-requests", "7", "--shutdown-grace-s", "2.5"])
    config = engine_config_from_args(args)
    assert (config.stream_interval, config.max_model_len, config.enable_prefix_caching) == (4, "auto", False)
    options = server_options_from_args(args)
    assert (options.host, options.port, options.api_key, options.max_waiting_requests, options.shutdown_grace_s) == (
        "127.0.0.1", 0, "k", 7, 2.5)


@pytest.mark.parametrize("options, field", [
    (dict(port=70000), "port"), (dict(tls_cert="c.pem"), "tls_cert"), (dict(max_waiting_requests=0), "max_waiting_requests"),
    (dict(max_message_bytes=10), "max_message_bytes"), (dict(shutdown_grace_s=-1), "shutdown_grace_s"),
])
def test_bad_server_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        ServerOptions(**options)
