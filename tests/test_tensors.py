"""The core's shared helpers: wire conversion (also of half types), float-array screening, seeded
generators, and where installed asset packages and the cache live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TARGETS, make_tiny

import fedlora as fl
from fedlora.assets import cache_root, package_dir
from fedlora.tensors import array_problem, seeded_generator, to_numpy


@pytest.mark.parametrize(("dtype", "want"), [
    (torch.bfloat16, np.float32), (torch.float16, np.float32), (torch.float32, np.float32), (torch.float64, np.float64),
])
def test_to_numpy_copies_and_sends_half_types_as_float32(dtype, want):
    t = torch.tensor([[1.5, -2.25], [0.125, 3.0]], dtype=dtype, requires_grad=dtype != torch.float16)
    arr = to_numpy(t)
    assert arr.dtype == want and arr.shape == (2, 2)
    np.testing.assert_array_equal(arr, [[1.5, -2.25], [0.125, 3.0]])  # exact: these values fit every dtype
    arr[0, 0] = 99.0
    assert float(t.detach()[0, 0]) == 1.5  # a copy, never a view of the tensor


def test_nested_states_of_a_bf16_model_are_float32_arrays():
    targets, save = TINY_TARGETS["bert"]
    model = make_tiny("bert", dtype=torch.bfloat16)
    fl.apply_nested(model, fl.NestedLoraConfig(r=4, target_modules=targets, modules_to_save=save))
    up, down = fl.inner_state(model), fl.global_state(model)
    assert {a.dtype for a in (*up.values(), *down.values())} == {np.dtype(np.float32)}
    fl.load_global_state(model, down)  # and they load back


@pytest.mark.parametrize(("arr", "shape", "reason"), [
    (np.zeros((2, 3), np.int64), None, "dtype int64 is not a real floating-point type"),
    (np.zeros((2, 3), np.complex64), None, "dtype complex64 is not a real floating-point type"),
    (np.zeros((2, 3)), (3, 2), "shape (2, 3) does not match expected (3, 2)"),
    (np.zeros((2, 3)), (None,), "shape (2, 3) does not match expected (None,)"),
    (np.array([1.0, np.nan, np.inf, -np.inf]), None, "non-finite values (1 NaN, 2 Inf)"),
    (np.zeros((2, 3), np.float32), (None, 3), None),
    (np.zeros((2, 3), np.float16), (2, 3), None),
])
def test_array_problem_names_the_first_problem(arr, shape, reason):
    assert array_problem(arr, shape) == reason


def test_seeded_generator():
    a, b = seeded_generator(7), seeded_generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    x, y = seeded_generator(None), seeded_generator(None)  # OS entropy: two draws differ
    assert not torch.equal(torch.rand(5, generator=x), torch.rand(5, generator=y))


def test_asset_package_and_cache_root(monkeypatch, tmp_path):
    assert (package_dir("numpy") / "__init__.py").is_file()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg"):
        package_dir("no_such_pkg")
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    from fedlora.outer import default_cache_dir

    assert default_cache_dir() == tmp_path / "outer"  # the outer-factor cache lives under the same root
    monkeypatch.setenv("FEDLORA_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "fedlora"
