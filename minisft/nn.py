"""Modules: parameter containers with the layers BERT is built from.

A Module registers every Parameter and sub-Module assigned to it as an attribute, in
definition order, so `named_parameters()` yields dotted names such as
"encoder.layer.0.attention.self.query.weight", the keys of a Hugging Face checkpoint.
"""
import math
from collections import namedtuple

import numpy

from minisft.engine import functional as F
from minisft.engine import random
from minisft.engine.backend import Device
from minisft.engine.tensor import Tensor

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimiser updates; requires grad."""

    def __init__(self, data, requires_grad=True):
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of layers and models: override `forward`; call the module to run it."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before assigning {name!r}")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    # --- traversal ----------------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def children(self):
        return iter(self._modules.values())

    def modules(self):
        return (module for _, module in self.named_modules())

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) pairs in definition order; a shared one appears once."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, param in module._parameters.items():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self):
        return [param for _, param in self.named_parameters()]

    # --- state ------------------------------------------------------------------------
    def state_dict(self):
        """{dotted name: raw array} of every parameter (the arrays themselves, not copies)."""
        return {name: param.data for name, param in self.named_parameters()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the parameters of the same name, cast to their dtype and device.

        Raises KeyError listing missing, unexpected and mis-shaped keys (mis-shaped always,
        the others when strict); returns (missing_keys, unexpected_keys).
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(p.shape)}"
                     for k, p in own.items()
                     if k in state_dict and tuple(state_dict[k].shape) != tuple(p.shape)]
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if misshaped:
            problems.append("shape mismatch: " + "; ".join(misshaped))
        if problems:
            raise KeyError(f"load_state_dict into {type(self).__name__} failed: "
                           + " | ".join(problems))
        for name, param in own.items():
            if name in state_dict:
                value = state_dict[name]
                value = value.data if isinstance(value, Tensor) else value
                param.data[...] = param.device.put(value)  # in place: views of it stay views
        return IncompatibleKeys(missing, unexpected)

    # --- modes and placement --------------------------------------------------------------
    def train(self, mode=True):
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for param in self.parameters():
            param.grad = None

    def requires_grad_(self, requires_grad=True):
        """Freeze (False) or unfreeze every parameter of this module and its submodules. A
        frozen parameter gets no gradient, no optimizer state (parameter_groups leaves it
        out), and no backward work that only it needs (e.g. a frozen Linear's weight
        gradient, and the input it would need)."""
        for param in self.parameters():
            param.requires_grad_(requires_grad)
            if not requires_grad:
                param.grad = None
        return self

    def to(self, device=None, dtype=None):
        """Move (in place) every parameter and its grad to `device` and/or float `dtype`."""
        device = None if device is None else Device(device)
        for param in self.parameters():
            target = device or param.device
            param.data = target.put(param.data)
            if dtype is not None:
                param.data = param.data.astype(dtype, copy=False)
            if param.grad is not None:
                param.grad = target.put(param.grad).astype(param.dtype, copy=False)
        for module in self.modules():
            module.after_move()
        return self

    def after_move(self):
        """Called on every module once `to` has moved the parameters (their arrays are new):
        a module that keeps views of them makes them again here."""

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"  ({name}): " + repr(module).replace("\n", "\n  ")
                 for name, module in self._modules.items()]
        body = "\n" + "\n".join(lines) + "\n" if lines else ""
        return f"{type(self).__name__}({self.extra_repr()}{body})"


class ModuleList(Module):
    """Sub-modules held in a list, registered as "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module):
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)


def _uniform(shape, bound):
    return random.generator("cpu").uniform(-bound, bound, size=shape).astype(numpy.float32)


class Linear(Module):
    """y = x @ weight.T + bias; weight (out_features, in_features), initialised as torch."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features) if in_features else 0
        self.weight = Parameter(_uniform((out_features, in_features), bound))
        self.bias = Parameter(_uniform((out_features,), bound)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(Module):
    """A lookup table (num_embeddings, embedding_dim); the padding_idx row starts at zero
    and receives no gradient."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None):
        super().__init__()
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"Embedding: padding_idx {padding_idx} is outside [0, {num_embeddings})")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        weight = random.generator("cpu").standard_normal((num_embeddings, embedding_dim),
                                                        dtype=numpy.float32)
        if self.padding_idx is not None:
            weight[self.padding_idx] = 0
        self.weight = Parameter(weight)

    def forward(self, input):
        return F.embedding(input, self.weight, self.padding_idx)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise the trailing dims; eps comes from the model config (1e-12 for BERT)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True):
        super().__init__()
        self.normalized_shape = ((normalized_shape,) if isinstance(normalized_shape, int)
                                 else tuple(normalized_shape))
        self.eps = eps
        self.weight = Parameter(numpy.ones(self.normalized_shape, numpy.float32)) if elementwise_affine else None
        self.bias = Parameter(numpy.zeros(self.normalized_shape, numpy.float32)) \
            if elementwise_affine and bias else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Identity(Module):
    """x as it is: a layer's place kept where a model has no such layer (ModernBERT's first
    attention norm)."""

    def forward(self, x):
        return x


class Dropout(Module):
    """Inverted dropout with probability p, active only in training mode; inplace: written
    over its input's array (for a product nothing else holds)."""

    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"Dropout: p must be in [0, 1], not {p}")
        self.p, self.inplace = p, inplace

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.inplace)

    def extra_repr(self):
        return f"p={self.p}" + (", inplace=True" if self.inplace else "")
