"""Finite-difference gradient checking in float64."""
import numpy

from minisft.engine.backend import Device
from minisft.engine.tensor import Tensor


class GradcheckError(AssertionError):
    pass


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0):
    """Check backward against central differences of `fn(*inputs)`, all in float64.

    Float inputs (Tensors or arrays) are copied to float64 leaves requiring grad; integer
    and bool inputs are passed as they are. The output is projected on a fixed random
    cotangent v, so one backward gives every input's gradient of sum(fn(...) * v), which is
    compared with (f(x + eps) - f(x - eps)) / 2eps element by element. Returns True or
    raises GradcheckError naming the input and the worst element.
    """
    device = next((x.device for x in inputs if isinstance(x, Tensor)), Device("cpu"))
    leaves = []
    for x in inputs:
        data = x.data if isinstance(x, Tensor) else x
        if hasattr(data, "dtype") and data.dtype.kind == "f":
            leaves.append(Tensor(device.put(data).astype(numpy.float64), requires_grad=True))
        else:
            leaves.append(x)
    out = fn(*leaves)
    if out.dtype != numpy.float64:
        raise GradcheckError(f"gradcheck: fn returned {out.dtype} for float64 inputs; "
                             "an op widened or narrowed the dtype")
    xp = device.xp
    v = device.put(numpy.random.default_rng(seed).standard_normal(out.shape))
    (out * Tensor(v)).sum().backward()

    def projected():
        return float((fn(*leaves).data * v).sum())

    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or not leaf.requires_grad:
            continue
        analytic = Device("cpu").put(leaf.grad if leaf.grad is not None else xp.zeros_like(leaf.data))
        numeric = numpy.zeros(leaf.shape)
        flat = leaf.data.reshape(-1)
        for j in range(flat.size):
            original = float(flat[j])
            flat[j] = original + eps
            plus = projected()
            flat[j] = original - eps
            minus = projected()
            flat[j] = original
            numeric.flat[j] = (plus - minus) / (2 * eps)
        error = numpy.abs(analytic - numeric) - (atol + rtol * numpy.abs(numeric))
        if (error > 0).any():
            j = int(error.argmax())
            raise GradcheckError(
                f"gradcheck: input {i} {tuple(leaf.shape)}: backward gives {analytic.flat[j]:.8g} "
                f"at flat index {j}, finite differences give {numeric.flat[j]:.8g}")
    return True
