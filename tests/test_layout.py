import numpy as np
import pytest

from kvwire import KVLayout, TensorSpec
from kvwire.layout import ALIGN_BYTES


def test_tensor_order_in_a_layer_does_not_matter():
    a = KVLayout(
        [{"k": TensorSpec((2, 8), "float16", per_token=True), "v": TensorSpec((2, 8), "float16", per_token=True)}]
    )
    b = KVLayout(
        [{"v": TensorSpec((2, 8), "float16", per_token=True), "k": TensorSpec((2, 8), "float16", per_token=True)}]
    )
    assert a.fingerprint == b.fingerprint
    assert a == b


def test_any_difference_changes_the_fingerprint():
    base = [{"x": TensorSpec((4,), "float32")}]
    variants = [
        [{"x": TensorSpec((5,), "float32")}],
        [{"x": TensorSpec((4,), "float16")}],
        [{"x": TensorSpec((4,), "float32", per_token=True)}],
        [{"y": TensorSpec((4,), "float32")}],
        base + base,
    ]
    prints = {KVLayout(v).fingerprint for v in variants}
    assert KVLayout(base).fingerprint not in prints
    assert len(prints) == len(variants)


def test_difference_names_layer_tensor_and_both_specs():
    mine = KVLayout(
        [{"conv": TensorSpec((8, 4), "float32")}, {"latent": TensorSpec((1, 80), "bfloat16", per_token=True)}]
    )
    theirs = KVLayout(
        [{"conv": TensorSpec((8, 4), "float32")}, {"latent": TensorSpec((1, 64), "bfloat16", per_token=True)}]
    )
    assert mine.difference(theirs) == (
        "layer 1 tensor 'latent': receiver has bfloat16[T, 1, 80], sender has bfloat16[T, 1, 64]"
    )
    fewer = KVLayout([{"conv": TensorSpec((8, 4), "float32")}])
    assert mine.difference(fewer) == "receiver has 2 layers, sender has 1"
    renamed = KVLayout(
        [{"conv": TensorSpec((8, 4), "float32")}, {"kv": TensorSpec((1, 80), "bfloat16", per_token=True)}]
    )
    assert mine.difference(renamed) == "layer 1: tensors only on receiver: ['latent'], only on sender: ['kv']"


def test_plan_aligns_every_tensor_and_scales_with_tokens():
    layout = KVLayout([{"a": TensorSpec((3,), "int8"), "b": TensorSpec((5,), "float32", per_token=True)}])
    plan = layout.plan(0, num_tokens=7)
    a, b = plan.slots
    assert (a.name, a.offset, a.nbytes, a.shape) == ("a", 0, 3, (3,))
    assert (b.name, b.offset, b.nbytes, b.shape) == ("b", ALIGN_BYTES, 7 * 5 * 4, (7, 5))
    assert plan.nbytes == ALIGN_BYTES + 140
    assert layout.nbytes(7) == 3 + 140
    assert layout.plan(0, 0).slots[1].shape == (0, 5)


def test_bad_specs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown dtype 'float128'"):
        TensorSpec((1,), "float128")
    with pytest.raises(ValueError, match="negative dimension"):
        TensorSpec((-1,), "float32")
    with pytest.raises(ValueError, match="layer 0 tensor 'x': expected a TensorSpec"):
        KVLayout([{"x": (1, 2)}])


def test_round_trip_through_the_wire_description():
    layout = KVLayout([{"s": TensorSpec((2, 2), "float8_e4m3fn"), "t": TensorSpec((3,), "bfloat16", per_token=True)}])
    again = KVLayout.from_description(layout.describe())
    assert again == layout
    assert again.layers[0]["t"].per_token is True
    assert np.dtype("float32").itemsize == layout.layers[0]["s"].itemsize * 4
