"""Inputs handed over as ConsumableInputs are released by task-vector methods; plain lists are not."""

import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods.common import ConsumableInputs
from mlxmerge.merge.registry import METHODS


def test_release_only_when_allowed_and_same_result():
    k = mx.random.split(mx.random.key(3), 3)
    base, a, b = (mx.random.normal((16, 8), key=key) for key in k)
    kw = {"weight": [1.0, 0.5], "density": [0.5, 0.5]}
    plain = [a, b]
    want = METHODS["ties"].fn(plain, base, **kw)
    assert plain[0] is a and plain[1] is b
    handed = ConsumableInputs([a, b])
    got = METHODS["ties"].fn(handed, base, **kw)
    assert list(handed) == [None, None]
    np.testing.assert_array_equal(np.array(got), np.array(want))
