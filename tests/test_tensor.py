"""The autograd engine: graph walking, accumulation, modes, dtypes and error messages."""
import math

import numpy as np
import pytest

import minisft
from minisft.engine.backend import Device
from minisft.engine.tensor import array_of
import minisft.functional as F
from conftest import assert_close


def test_broadcast_gradients_reduce_to_input_shapes(device):
    a = minisft.tensor(np.ones((3, 1, 4)), requires_grad=True, device=device)
    b = minisft.tensor(np.ones((2, 4)), requires_grad=True, device=device)
    (a * b + b).sum().backward()
    assert a.grad.shape == (3, 1, 4) and b.grad.shape == (2, 4)
    assert_close(a.grad, np.full((3, 1, 4), 2.0))
    assert_close(b.grad, np.full((2, 4), 6.0))  # 3 copies of (a + 1)


def test_shared_subgraph_accumulates(device):
    x = minisft.tensor([2.0], requires_grad=True, device=device)
    y = x * x          # used twice below
    z = (y + y * 3).sum()
    z.backward()
    assert_close(x.grad, [16.0])  # d(4x^2)/dx


def test_grads_accumulate_across_backward_calls(device):
    x = minisft.tensor([1.0, 2.0], requires_grad=True, device=device)
    (x * 3).sum().backward()
    (x * 3).sum().backward()
    assert_close(x.grad, [6.0, 6.0])


def test_leaf_grads_do_not_alias(device):
    a = minisft.tensor([1.0], requires_grad=True, device=device)
    b = minisft.tensor([1.0], requires_grad=True, device=device)
    (a + b).sum().backward()
    a.grad += 5
    assert_close(b.grad, [1.0])


def test_ten_thousand_node_chain_has_no_recursion_limit(device):
    x = minisft.tensor([1.0], requires_grad=True, device=device)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    assert math.isclose(float(x.grad[0]), 1.0001 ** 10_000, rel_tol=1e-3)


def test_no_grad_records_nothing(device):
    x = minisft.tensor([1.0], requires_grad=True, device=device)
    with minisft.no_grad():
        y = F.gelu(x * 2)
        assert not minisft.is_grad_enabled()
    assert minisft.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf


def test_requires_grad_propagates_and_detach_cuts(device):
    x = minisft.tensor([1.0], requires_grad=True, device=device)
    c = minisft.tensor([2.0], device=device)
    assert (x * c).requires_grad and not (c * c).requires_grad
    d = (x * c).detach()
    assert not d.requires_grad and d.is_leaf


def test_saved_arrays_are_freed_after_backward(device):
    x = minisft.tensor([1.0, 2.0], requires_grad=True, device=device)
    y = x.exp()
    fn = y._ctx
    y.sum().backward()
    assert fn.saved is None and fn.parents is None
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.sum().backward()


def test_retain_graph_allows_a_second_backward(device):
    x = minisft.tensor([1.0, 2.0], requires_grad=True, device=device)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert_close(x.grad, [4.0, 8.0])


def test_backward_with_explicit_gradient(device):
    x = minisft.tensor([1.0, 2.0], requires_grad=True, device=device)
    (x * 3).backward(np.array([1.0, -1.0], np.float32))
    assert_close(x.grad, [3.0, -3.0])


def test_backward_gradient_is_moved_and_cast_to_the_tensor(device):
    """A host gradient (a list, float64 NumPy) is put on the tensor's device in its dtype:
    CuPy never copies from the host by itself."""
    x = minisft.tensor([1.0, 2.0], requires_grad=True, device=device)
    (x * 3).backward([1.0, -1.0])
    (x * 1).backward(np.array([1.0, 1.0]))
    assert x.grad.dtype == np.float32 and x.grad.__class__ is x.data.__class__
    assert_close(x.grad, [4.0, -2.0])
    with pytest.raises(TypeError, match="floating-point gradient"):
        (x * 3).backward(np.array([1, 1]))
    with pytest.raises(ValueError, match=r"grad has shape \(3,\)"):
        (x * 3).backward(np.ones(3))


def test_array_of_takes_tensors_arrays_and_lists(device):
    x = minisft.tensor([1, 2], device=device)
    assert array_of(x) is x.data and array_of(x.data) is x.data
    assert isinstance(array_of([1, 2]), np.ndarray)


def test_ops_run_inside_the_device_of_their_first_input(monkeypatch):
    """Function.__call__ and backward enter on_device(array): on the CPU a shared no-op
    context, on a GPU the array's CuPy device (so cuda:1 runs on GPU 1)."""
    entered = []
    real = minisft.tensor.__globals__["on_device"]
    monkeypatch.setitem(minisft.tensor.__globals__, "on_device", lambda a: entered.append(a.shape) or real(a))
    x = minisft.tensor(np.ones((2, 3)), requires_grad=True)
    (x * 2).sum().backward()
    assert entered == [(2, 3), (2, 3), ()]  # x * 2, its sum, and the backward from the sum
    assert real(x.data) is real(np.zeros(1))


def test_float32_default_and_no_silent_widening(device):
    x = minisft.tensor([1.0, 2.0], device=device)
    assert x.dtype == np.float32
    assert (x * 0.5 + np.float64(2.0)).dtype == np.float32
    assert (x + np.ones(2, np.float64)).dtype == np.float32
    assert (x * 2).dtype == np.float32
    d = minisft.tensor([1.0], dtype="float64", device=device)
    assert (d * 0.5).dtype == np.float64
    assert minisft.tensor([1, 2], device=device).dtype == np.int64
    with pytest.raises(TypeError, match="float32 and float64"):
        x + d


def test_to_dtype_is_differentiable(device):
    x = minisft.tensor([1.0, 2.0], requires_grad=True, device=device)
    (x.double() * 2).sum().backward()
    assert x.grad.dtype == np.float32
    assert_close(x.grad, [2.0, 2.0])


def test_comparisons_have_no_grad(device):
    x = minisft.tensor([1.0, -2.0], requires_grad=True, device=device)
    m = x > 0
    assert m.dtype == bool and not m.requires_grad
    assert m.tolist() == [True, False]


def test_matmul_shape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4, 5\)"):
        minisft.tensor(np.ones((2, 3))) @ minisft.tensor(np.ones((4, 5)))


def test_add_shape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\)"):
        minisft.tensor(np.ones((2, 3))) + minisft.tensor(np.ones(4))


def test_backward_on_non_scalar_needs_gradient():
    x = minisft.tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"needs a scalar.*shape \(2, 2\)"):
        (x * 2).backward()


def test_mixing_devices_says_which_tensor_is_where(monkeypatch):
    a = minisft.tensor(np.ones(2))
    b = minisft.tensor(np.ones(2))
    real = minisft.tensor.__globals__["device_of"]
    monkeypatch.setitem(minisft.tensor.__globals__, "device_of",
                        lambda x: Device("cuda:0") if x is b.data else real(x))
    with pytest.raises(RuntimeError, match=r"input 0 \(2,\) on cpu, input 1 \(2,\) on cuda:0"):
        a + b


@pytest.mark.skipif(minisft.cuda_available(), reason="checks the message shown without CuPy")
@pytest.mark.skipif(minisft.cuda_available(), reason="CuPy and a GPU are here")
def test_cuda_without_cupy_says_how_to_install():
    from minisft.engine.errors import MissingExtra, UsageError

    with pytest.raises((MissingExtra, UsageError), match="pip install|NVIDIA GPU"):
        minisft.tensor([1.0], device="cuda")


def test_device_parsing():
    assert str(Device("cuda:1")) == "cuda:1" and Device("cuda") == Device("cuda:0")
    with pytest.raises(ValueError, match="unknown device"):
        Device("tpu")


def test_to_device_round_trip(device):
    x = minisft.tensor([1.0, 2.0], requires_grad=True)
    y = x.to(device)
    assert y.device == Device(device)
    (y * 2).sum().backward()
    assert_close(x.grad, [2.0, 2.0])
    assert isinstance(x.grad, np.ndarray)


def test_one_gradient_array_returned_for_two_inputs_is_not_shared():
    """A leaf's .grad must not be the array still pending for another node: adding the
    leaf's next gradient into it would change that node's gradient too."""
    class Twice(minisft.tensor.__globals__["Function"]):
        def forward(self, a, b):
            return a + b

        def backward(self, g):
            grad = g * 1.0  # a fresh array, handed to both inputs
            return grad, grad

    a = minisft.tensor([1.0], requires_grad=True)
    c = minisft.tensor([2.0], requires_grad=True)
    x = c * 1.0
    out = Twice.apply(a, x) + a * x  # a's second gradient arrives before x's is complete
    out.sum().backward()
    assert_close(a.grad, [1.0 + 2.0])  # 1 + x
    assert_close(c.grad, [1.0 + 1.0])  # 1 + a


def test_a_fresh_gradient_is_taken_even_with_the_id_of_one_freed_before(monkeypatch):
    """A leaf's second gradient is added into its .grad and freed; the next array made may
    get its id. That array is still fresh: the leaf it goes to takes it, with no copy (a
    copy of a word embedding's gradient is 45 MB)."""
    import minisft.engine.tensor as tensor_module
    from minisft.engine.tensor import Function

    class Fresh(Function):  # y = x; backward hands x a new array
        def forward(self, x):
            return x.copy()

        def backward(self, g):
            return (g * 1,)

    taken, accumulate = [], tensor_module._accumulate_leaf
    monkeypatch.setattr(tensor_module, "_accumulate_leaf",
                        lambda leaf, grad, owned: (taken.append(owned), accumulate(leaf, grad, owned)))
    a, b = (minisft.tensor(np.ones(3, np.float32), requires_grad=True) for _ in range(2))
    ((Fresh.apply(a) + Fresh.apply(a)).sum() + Fresh.apply(b).sum()).backward()
    assert taken == [True, True, True]
    assert np.array_equal(a.grad, [2, 2, 2]) and np.array_equal(b.grad, [1, 1, 1])
