"""``verify=False``: frames without checksums, only where both ends agree, and what that
gives up (a flipped bit reaches the engine)."""

from __future__ import annotations

import numpy as np
import pytest

from kvwire import (
    IntegrityError,
    KVLayout,
    Receiver,
    RemoteProtocolError,
    Sender,
    TensorSpec,
    VerifyMismatchError,
)
from kvwire.testing.relay import Fault, FaultyRelay
from kvwire.transport.ucx import ucx_available
from kvwire.wire import framing
from kvwire.wire.messages import Data

from .support import assert_same_bytes, hybrid_layout, random_kv
from .support import send_all, wait_until

ONE = KVLayout([{"x": TensorSpec((1024,), "uint8", per_token=True)}])  # 1 KiB a token, one layer
TOKENS = 1024  # one 1 MiB chunk


def one_tensor(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (TOKENS, 1024), dtype=np.uint8)


@pytest.mark.parametrize("backend", ["tcp", pytest.param("ucx", marks=pytest.mark.skipif(
    not ucx_available(), reason="ucxx is not importable"))])
def test_a_session_both_ends_agreed_to_leave_unchecked_moves_exact_bytes(backend):
    layout = hybrid_layout()
    kv = random_kv(layout, 300)
    with Receiver(layout, backend=backend, verify=False) as rx:
        with Sender(layout, rx.address, backend=backend, verify=False) as tx:
            send_all(tx, "unchecked", kv, 300)
        with rx.wait("unchecked", timeout=10) as got:
            for layer, tensors in enumerate(kv):
                assert_same_bytes(got.layer(layer, timeout=10), tensors)


def test_what_skipping_checks_gives_up_a_flipped_bit_reaches_the_engine():
    sent = one_tensor()
    with Receiver(ONE, verify=False) as rx, FaultyRelay(rx.address, Fault(flip_bit_at=300_000)) as relay:
        with Sender(ONE, relay.address, verify=False, streams=1) as tx:
            xfer = tx.open("flipped", TOKENS)
            xfer.send_layer(0, {"x": sent})
            xfer.finish(timeout=10)  # no error: nothing was checked
        with rx.wait("flipped", timeout=10) as got:
            arrived = got.layer(0, timeout=10)["x"]
            differs = np.flatnonzero(arrived.reshape(-1) != sent.reshape(-1))
            assert len(differs) == 1 and arrived.reshape(-1)[differs[0]] == sent.reshape(-1)[differs[0]] ^ 1


def test_a_sender_that_checks_is_checked_where_the_receiver_would_allow_skipping():
    with (Receiver(ONE, verify=False) as rx, FaultyRelay(rx.address, Fault(flip_bit_at=300_000)) as relay,
          Sender(ONE, relay.address, streams=1) as tx):
        xfer = tx.open("flipped", TOKENS)
        xfer.send_layer(0, {"x": one_tensor()})
        with pytest.raises(IntegrityError, match="layer 0 chunk 0: checksum mismatch"):
            xfer.finish(timeout=10)


def test_a_receiver_that_requires_checks_refuses_a_sender_without_them():
    with Receiver(ONE) as rx:
        with pytest.raises(VerifyMismatchError, match=r"requires a checksum on every frame .*sender has verify=False"):
            Sender(ONE, rx.address, verify=False, streams=1)
        wait_until(lambda: rx.refusals())
        ((_, error),) = rx.refusals()
        assert isinstance(error, VerifyMismatchError)
        # and it still serves senders that check
        with Sender(ONE, rx.address, streams=1) as tx:
            send_all(tx, "checked", [{"x": one_tensor()}], TOKENS)
        rx.wait("checked", timeout=10).release()


def test_a_frame_without_its_checksum_in_a_session_that_checks_fails_its_request():
    with Receiver(ONE) as rx, Sender(ONE, rx.address, streams=1) as tx:
        xfer = tx.open("sneaky", TOKENS)
        got = rx.wait("sneaky", timeout=10)
        payload = one_tensor()
        tx.connections[0].send([framing.encode(Data(xfer.rid, 0, 0, payload.nbytes, 0, "none")), payload])
        with pytest.raises(RemoteProtocolError, match="layer 0 chunk 0 came without a checksum"):
            got.wait_layer(0, timeout=10)
