"""``backend="auto"``: the choice as a pure function of both ends' capabilities, and the
cases that need no UCX at all (ucxx missing, TLS, a TCP sender to an auto receiver).
UCX round trips through ``auto`` are in test_ucx.py."""

import logging

import pytest

from kvwire import Receiver, Sender
from kvwire.transport import AutoOptions, Capabilities, TcpOptions, UcxOptions, auto

from .support import assert_same_bytes, random_kv, tls_contexts

SECRET = b"test-secret"
NO_FABRIC = Capabilities("ucx", default_streams=1)
RDMA = Capabilities("ucx", default_streams=1, fabrics=("rc_mlx5",))
SHARED_MEMORY_OFFERED = Capabilities("ucx", default_streams=1, shared_memory=True)
SAME_HOST = Capabilities("ucx", default_streams=1, shared_memory=True)


@pytest.mark.parametrize(
    "options, tls, here, link, backend, why",
    [
        (AutoOptions(), True, RDMA, None, "tcp", "TLS requested; UCX has no encryption"),
        (AutoOptions(), False, "ucxx is not installed", None, "tcp", "ucxx is not installed"),
        (AutoOptions(), False, "UCX cannot start here: UCXError: no device", None, "tcp",
         "UCX cannot start here: UCXError: no device"),
        (AutoOptions(), False, NO_FABRIC, None, "tcp", auto.OVER_TCP),
        (AutoOptions(ucx_over_tcp=True), False, NO_FABRIC, None, "ucx", "trying UCX"),
        (AutoOptions(), False, RDMA, None, "ucx", "trying UCX"),
        (AutoOptions(), False, SHARED_MEMORY_OFFERED, None, "ucx", "trying UCX"),
        # once connected: what the two ends share decides
        (AutoOptions(), False, RDMA, RDMA, "ucx", "ucx-net, fabric: rc_mlx5"),
        (AutoOptions(), False, RDMA, NO_FABRIC, "tcp", auto.OVER_TCP),  # the peer has another fabric
        (AutoOptions(), False, SHARED_MEMORY_OFFERED, SAME_HOST, "ucx", "ucx-local, fabric: none"),
        (AutoOptions(), False, SHARED_MEMORY_OFFERED, NO_FABRIC, "tcp", auto.OVER_TCP),  # the peer is elsewhere
        (AutoOptions(ucx_over_tcp=True), False, NO_FABRIC, NO_FABRIC, "ucx", "ucx-net, fabric: none"),
    ],
    ids=["tls", "no-ucxx", "ucx-broken", "no-fabric", "forced", "rdma", "shm-offered", "rdma-shared", "rdma-not-shared",
         "same-host", "shm-peer-elsewhere", "forced-connected"],
)
def test_the_choice_for_each_capability_mix(options, tls, here, link, backend, why):
    assert auto.choose(options, tls=tls, here=here, link=link) == auto.Choice(backend, why)


def test_auto_takes_any_backend_s_options_and_refuses_others():
    assert auto.auto_options(None) == AutoOptions()
    assert auto.auto_options(TcpOptions(buffer_bytes=1 << 20)).tcp.buffer_bytes == 1 << 20
    assert auto.auto_options(UcxOptions(shared_memory=True)).ucx.shared_memory
    with pytest.raises(TypeError, match="the auto backend takes AutoOptions, TcpOptions or UcxOptions, got dict"):
        auto.auto_options({"tcp": None})


def test_a_backend_given_another_backend_s_options_says_so(layout):
    with Receiver(layout, secret=SECRET) as rx, pytest.raises(
        TypeError, match="the tcp backend takes TcpOptions, got UcxOptions"
    ):
        Sender(layout, rx.address, secret=SECRET, transport_options=UcxOptions())


@pytest.fixture(autouse=True)
def _auto_log(caplog):
    caplog.set_level(logging.INFO, logger="kvwire")
    auto.forget_logged_choices()


def round_trip(layout, address, backend, **kw):
    kv = random_kv(layout, 120, seed=11)
    with Sender(layout, address, backend=backend, secret=SECRET, **kw) as tx:
        names = tx.backend_names
        xfer = tx.open("auto-rt", 120)
        for i, tensors in enumerate(kv):
            xfer.send_layer(i, tensors)
        xfer.finish(timeout=10)
    return kv, names


def test_auto_uses_tcp_when_ucxx_is_missing(layout, caplog, monkeypatch):
    monkeypatch.setattr(auto, "ucx_module", lambda: None)
    with Receiver(layout, backend="auto", secret=SECRET) as rx:
        kv, names = round_trip(layout, rx.address, "auto", streams=2)
        with rx.wait("auto-rt", timeout=10) as got:
            assert_same_bytes(got.layer(0), kv[0])
    assert names == ["tcp", "tcp"]
    assert f"{rx.address} uses tcp (ucxx is not installed)" in caplog.text


def test_an_auto_sender_left_to_choose_its_streams_over_tcp_tunes_them(layout, monkeypatch):
    """AutoOptions' TCP settings take the tuning's buffer size, as TcpOptions do."""
    monkeypatch.setattr(auto, "ucx_module", lambda: None)
    options = AutoOptions(tcp=TcpOptions(congestion_control="auto"))
    with Receiver(layout, backend="tcp", secret=SECRET) as rx, Sender(
        layout, rx.address, backend="auto", secret=SECRET, transport_options=options
    ) as tx:
        assert tx.tuning is not None and tx.num_streams == tx.tuning.num_streams
        assert set(tx.backend_names) == {"tcp"}


def test_an_auto_receiver_serves_tcp_senders_too(layout):
    with Receiver(layout, backend="auto", secret=SECRET) as rx:
        kv, _ = round_trip(layout, rx.address, "tcp", streams=2)
        with rx.wait("auto-rt", timeout=10) as got:
            assert_same_bytes(got.layer(3), kv[3])


def test_auto_with_tls_is_tcp_with_tls(layout, tls_files, caplog):
    server_ctx, client_ctx = tls_contexts(tls_files)
    with Receiver(layout, backend="auto", secret=SECRET, ssl_context=server_ctx) as rx:
        kv, names = round_trip(layout, rx.address, "auto", ssl_context=client_ctx, streams=2)
        with rx.wait("auto-rt", timeout=10) as got:
            assert_same_bytes(got.layer(3), kv[3])
    assert names == ["tcp", "tcp"]
    assert f"{rx.address} uses tcp (TLS requested; UCX has no encryption)" in caplog.text
