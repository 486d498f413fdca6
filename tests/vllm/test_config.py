"""The connector's options are checked when vLLM builds it: bad ones stop the engine with
the key named, before any request can be answered as if all were well."""

import json

import pytest

from kvwire.integrations.vllm.config import ConnectorConfig
from serving.vllm_engine import Engine


@pytest.mark.parametrize("extra, role, message", [
    ({"listen": "localhost"}, "kv_consumer", "kv_connector_extra_config['listen']: 'localhost' is not HOST:PORT"),
    ({"listen": "127.0.0.1:70000"}, "kv_consumer", "port 70000 of '127.0.0.1:70000' is outside 0..65535"),
    ({}, "kv_consumer", "needs \"listen\": \"HOST:PORT\""),
    ({"decode": "host"}, "kv_producer", "['decode']: 'host' is not HOST:PORT"),
    ({"lisen": "127.0.0.1:1"}, "kv_producer", "unknown kv_connector_extra_config keys ['lisen']"),
    ({"codec": "fp4"}, "kv_producer", "'fp4' is not one of"),
    ({"backend": "rdma"}, "kv_producer", "'rdma' is not one of ('tcp', 'ucx', 'auto')"),
    ({"streams": 0}, "kv_producer", "expected an integer in 1..1024, got 0"),
    ({"secret_file": "/nonexistent/secret"}, "kv_producer", "cannot read /nonexistent/secret"),
    ({"tls_cert": "c.pem"}, "kv_producer", "'tls_cert' and 'tls_key' go together"),
    ({"verify": "no"}, "kv_producer", "['verify']: expected true or false, got 'no'"),
])
def test_bad_options_are_refused_with_the_key_named(extra, role, message):
    with pytest.raises(ValueError) as error:
        ConnectorConfig.parse(extra, role=role)
    assert message in str(error.value)


def test_an_empty_secret_file_is_refused(tmp_path):
    (tmp_path / "secret").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ConnectorConfig.parse({"secret_file": str(tmp_path / "secret")}, role="kv_producer")


def test_an_engine_with_a_malformed_listen_address_does_not_start(vllm_model, engine_logs):
    engine = Engine("bad-listen", vllm_model, "--kv-role", "kv_consumer", "--kv-extra",
                    json.dumps({"listen": "localhost"}), log_dir=engine_logs)
    with pytest.raises(RuntimeError, match="exited"):
        engine.wait_ready(240)
    assert "kv_connector_extra_config['listen']: 'localhost' is not HOST:PORT" in engine.log_text()
    engine.close()


def test_a_port_in_use_stops_the_decode_engine_naming_it(vllm_model, engine_logs):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        engine = Engine("port-in-use", vllm_model, "--kv-role", "kv_consumer", "--kv-extra",
                        json.dumps({"listen": address}), log_dir=engine_logs)
        with pytest.raises(RuntimeError, match="exited"):
            engine.wait_ready(240)
    log = engine.log_text()
    engine.close()
    assert (f"kv_connector_extra_config['listen'] (rank 0): cannot listen on {address}: Address already in use"
            in log), log[-2000:]

