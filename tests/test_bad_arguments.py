"""Bad addresses, bad arguments and wrong peers: a clear error from the constructor, before any thread runs."""

import socket
import ssl
import threading

import pytest

from kvwire import PeerLostError, ProtocolError, Receiver, ReceiverOptions, Sender, SenderOptions
from kvwire.address import parse_address


@pytest.mark.parametrize("address,message", [
    ("localhost", "Sender address: 'localhost' is not HOST:PORT (e.g. '10.0.0.2:7800')"),
    ("localhost:", "Sender address: 'localhost:' is not HOST:PORT (e.g. '10.0.0.2:7800')"),
    (":7800", "Sender address: ':7800' is not HOST:PORT (e.g. '10.0.0.2:7800')"),
    ("127.0.0.1:70000", "Sender address: port 70000 of '127.0.0.1:70000' is outside 1..65535"),
    ("127.0.0.1:0", "Sender address: port 0 of '127.0.0.1:0' is outside 1..65535"),
    ("::1:7800", "Sender address: '::1:7800' is not HOST:PORT (an IPv6 host goes in brackets: '[::1]:7800')"),
    ("http://10.0.0.2:7800", "Sender address: 'http://10.0.0.2:7800' is a URL; give HOST:PORT without a scheme "
                             "(e.g. '10.0.0.2:7800')"),
    ("10.0.0.2 :7800", "Sender address: '10.0.0.2 :7800' does not start with a host name or IP address"),
    (("10.0.0.2", 7800), "Sender address: expected a \"HOST:PORT\" string such as '10.0.0.2:7800', got ('10.0.0.2', 7800)"),
])
def test_sender_names_a_malformed_address_without_starting_threads(layout, address, message):
    before = threading.active_count()
    with pytest.raises(ValueError) as error:
        Sender(layout, address)
    assert str(error.value) == message
    assert threading.active_count() == before


@pytest.mark.parametrize("listen,message", [
    ("7800", "Receiver listen: '7800' is not HOST:PORT (e.g. '0.0.0.0:7800')"),
    ("127.0.0.1:65536", "Receiver listen: port 65536 of '127.0.0.1:65536' is outside 0..65535"),
])
def test_receiver_names_a_malformed_listen_address(layout, listen, message):
    with pytest.raises(ValueError) as error:
        Receiver(layout, listen)
    assert str(error.value) == message


def test_ipv6_and_port_zero_for_listening():
    assert parse_address("[::1]:7800") == ("::1", 7800)
    assert parse_address("0.0.0.0:0", listen=True) == ("0.0.0.0", 0)


def test_a_port_in_use_is_named(layout, receiver):
    with pytest.raises(OSError) as error:
        Receiver(layout, receiver.address)
    assert str(error.value) == f"[Errno 98] cannot listen on {receiver.address}: Address already in use"


def test_an_unknown_host_is_named(layout):
    with pytest.raises(PeerLostError) as error:
        Sender(layout, "no-such-host.invalid:7800", timeout=5)
    assert str(error.value).startswith("cannot connect to no-such-host.invalid:7800: host 'no-such-host.invalid' not found")
    assert not error.value.refused


def test_nobody_listening_is_connection_refused(layout):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PeerLostError) as error:
        Sender(layout, f"127.0.0.1:{port}", resume_window_s=0)
    assert str(error.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert error.value.refused and error.value.peer == f"127.0.0.1:{port}"  # what a retry loop reads, not the text


def test_a_peer_that_is_not_kvwire_is_named(layout):
    """An HTTP server on the port (the usual mistake: the worker's HTTP port for its KV port)."""
    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"

    def answer_like_http():
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer_like_http, daemon=True)
    thread.start()
    try:
        with pytest.raises(ProtocolError) as error:
            Sender(layout, address, streams=2)
    finally:
        thread.join(10)
        server.close()
    assert str(error.value) == (
        f"the peer at {address} does not speak kvwire: it sent b'HTTP'... (frame header of 1213486160 bytes is "
        "outside 1..65536)"
    )


def test_an_error_in_a_dial_thread_reaches_the_caller_as_itself(layout, receiver):
    pytest.importorskip("ucxx", reason="ucxx is in the test extra (kvwire[ucx]); without it there is no ucx backend to refuse")
    with pytest.raises(ValueError) as error:
        Sender(layout, receiver.address, backend="ucx", ssl_context=ssl.create_default_context(), streams=3)
    assert str(error.value) == "the ucx backend has no TLS; use backend='tcp' (or 'auto') with an ssl_context"


@pytest.mark.parametrize("make,error,message", [
    (lambda layout, address: Sender(layout, address, secret="s3cret"), TypeError,
     "Sender: secret must be bytes or None, got str (encode it: secret.encode())"),
    (lambda layout, address: Sender(layout, address, secret=b""), ValueError,
     "Sender: secret is empty; give None to run without authentication"),
    (lambda layout, address: Sender({"k": None}, address), TypeError,
     "Sender: layout must be a kvwire.KVLayout, got dict"),
    (lambda layout, address: Sender(layout, address, timeout=0), ValueError,
     "Sender: timeout must be a number > 0, got 0"),
    (lambda layout, address: Receiver(layout, secret="s3cret"), TypeError,
     "Receiver: secret must be bytes or None, got str (encode it: secret.encode())"),
    (lambda layout, address: Receiver(layout, max_bytes=-1), ValueError,
     "Receiver: max_bytes must be a number > 0, got -1"),
    (lambda layout, address: Receiver(layout, backend="tpc"), ValueError,
     "unknown backend 'tpc'; known backends: ['auto', 'tcp', 'ucx']"),
    (lambda layout, address: Sender(layout, address, stream=2), TypeError,
     "Sender() got unexpected keyword arguments ['stream'] (see kvwire.SenderOptions)"),
    (lambda layout, address: Sender(layout, address, timeout=1, connect_timeout_s=2), TypeError,
     "Sender: give 'connect_timeout_s' or its old name 'timeout', not both"),
    (lambda layout, address: Sender(layout, address, options=ReceiverOptions()), TypeError,
     "Sender: options must be a kvwire.SenderOptions, got ReceiverOptions"),
    (lambda layout, address: Sender(layout, address, options=SenderOptions(connect_timeout_s=-1)), ValueError,
     "Sender: connect_timeout_s must be a number > 0, got -1"),
    (lambda layout, address: Receiver(layout, options=ReceiverOptions(resume_grace_s=-1)), ValueError,
     "Receiver: resume_grace_s must be >= 0, got -1"),
    (lambda layout, address: Receiver(layout, also_accepted=[{"k": None}]), TypeError,
     "Receiver also_accepted: layout must be a kvwire.KVLayout, got dict"),
])
def test_a_bad_argument_is_named_by_the_constructor(layout, receiver, make, error, message):
    before = threading.active_count()
    with pytest.raises(error) as raised:
        make(layout, receiver.address)
    assert str(raised.value) == message
    assert threading.active_count() == before


def test_settings_come_as_options_or_keywords_and_a_keyword_wins(layout, receiver):
    options = SenderOptions(streams=2, connect_timeout_s=5.0, secret=b"test-secret")
    assert "test-secret" not in repr(options)  # options may be logged; the secret never is
    with Sender(layout, receiver.address, options=options, streams=1) as tx:
        assert tx.num_streams == 1 and tx.options.streams == 1
        assert tx.options.connect_timeout_s == 5.0 and tx.options.secret == b"test-secret"
    with Sender(layout, receiver.address, secret=bytearray(b"test-secret"), streams=1, timeout=3) as tx:
        assert tx.options.secret == b"test-secret" and tx.options.connect_timeout_s == 3
    with Receiver(layout, options=ReceiverOptions(max_bytes=1 << 20), info=b"tp=2") as rx:
        assert (rx.options.max_bytes, rx.options.info) == (1 << 20, b"tp=2")
