"""Optimisers, learning-rate schedules and gradient clipping, with torch's exact rules.

Each optimiser updates `param.data` in place from `param.grad`, keeping its per-parameter
state (momentum buffers, Adam moments, step counts) as arrays on the parameter's device.
"""
import math

import numpy

from minisft import kernels
from minisft.engine.backend import get_array_module
from minisft.engine.runtime import one_blas_thread


class Optimizer:
    """Parameter groups (each a dict of hyper-parameters with its "params") and state."""

    def __init__(self, params, defaults):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = defaults
        self.param_groups = []
        for group in groups:
            unknown = set(group) - set(defaults) - {"params"}
            if unknown:
                raise ValueError(f"{type(self).__name__}: unknown group options {sorted(unknown)}")
            self.param_groups.append({**defaults, **group, "params": list(group["params"])})
        self.state = {}  # id(param) -> dict of arrays and counters

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self):
        for param in self._params():
            param.grad = None

    def step(self):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.update(param, param.grad, self.state.setdefault(id(param), {}), group)

    def update(self, param, grad, state, group):
        raise NotImplementedError

    def state_dict(self):
        """Plain data: per-parameter state by position, and the groups' hyper-parameters."""
        index = {id(p): i for i, p in enumerate(self._params())}
        return {"state": {index[key]: dict(value) for key, value in self.state.items() if key in index},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                  "params": [index[id(p)] for p in g["params"]]}
                                 for g in self.param_groups]}

    def load_state_dict(self, state_dict):
        params = self._params()
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match these parameter groups")
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for i, value in state_dict["state"].items():
            param = params[int(i)]
            state_dtype = numpy.promote_types(param.dtype, numpy.float32)  # float16 parameters keep float32 moments
            self.state[id(param)] = {k: (param.device.put(v).astype(state_dtype) if hasattr(v, "shape") else v)
                                     for k, v in value.items()}


class SGD(Optimizer):
    """p -= lr * d, with d = grad + weight_decay * p, through momentum (and Nesterov)."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def update(self, param, grad, state, group):
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * param.data
        momentum = group["momentum"]
        if momentum:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = grad.copy()
            else:
                buffer *= momentum
                buffer += (1 - group["dampening"]) * grad
            grad = grad + momentum * buffer if group["nesterov"] else buffer
        param.data -= group["lr"] * grad


class Adam(Optimizer):
    """Adam with bias correction; weight_decay is L2 added to the gradient (torch.optim.Adam)."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self):
        """Every parameter's update; a kernel set with adam_update_many (the GPU's) does them
        all in one launch."""
        updates = [(param, self._update_arguments(param, param.grad, self.state.setdefault(id(param), {}), group))
                   for group in self.param_groups for param in group["params"] if param.grad is not None]
        if not updates:
            return
        kernel_set = kernels.for_array(updates[0][1][0])
        if hasattr(kernel_set, "adam_update_many"):
            kernel_set.adam_update_many(*(list(column) for column in zip(*(arguments for _, arguments in updates))))
        else:
            for _, (data, grad, exp_avg, exp_avg_sq, hyper) in updates:
                kernels.for_array(data).adam_update(data, grad, exp_avg, exp_avg_sq, **hyper)
        for param, (data, *_) in updates:
            if data is not param.data:
                param.data[...] = data

    def _update_arguments(self, param, grad, state, group):
        """adam_update's arguments for this parameter: (data, grad, exp_avg, exp_avg_sq,
        hyper-parameters), state advanced by one step. A float16 parameter is updated through
        a float32 copy (data), which the caller writes back: eps (1e-8) and the squared
        moments underflow to 0 in float16, and the step would divide by zero."""
        xp = get_array_module(param.data)
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        data = param.data.astype(xp.float32) if param.data.dtype == xp.float16 else param.data
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(data)
            state["exp_avg_sq"] = xp.zeros_like(data)
        state["step"] += 1
        step = state["step"]
        grad = grad.astype(data.dtype, copy=False)
        if weight_decay and not self.decoupled:
            grad = grad + weight_decay * data
        decay = 1 - lr * weight_decay if weight_decay and self.decoupled else None
        return data, grad, state["exp_avg"], state["exp_avg_sq"], dict(
            decay=decay, beta1=beta1, beta2=beta2, eps=eps, step_size=lr / (1 - beta1 ** step),
            bias_correction2=math.sqrt(1 - beta2 ** step))


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr * weight_decay before the Adam step
    (torch.optim.AdamW; default weight_decay 0.01)."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def parameter_groups(model, weight_decay, no_decay=("bias", "LayerNorm.weight")):
    """Two groups as the usual recipe: decay for weight matrices, none for biases and
    LayerNorm weights (any parameter whose name ends with an entry of `no_decay`). Frozen
    parameters (requires_grad False) are left out."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name.endswith(tuple(no_decay)) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0):
    """Scale all gradients together so that their global norm is at most max_norm.
    Returns the norm before clipping (a float)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = _total_norm_of(grads, norm_type)
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for g in grads:
            g *= g.dtype.type(coefficient)
    return total


def grad_norm(parameters, norm_type=2.0):
    """The norm of all gradients together (0.0 without any), as clip_grad_norm_ measures it."""
    return _total_norm_of([p.grad for p in parameters if p.grad is not None], norm_type)


def _total_norm_of(grads, norm_type):
    if not grads:
        return 0.0
    with one_blas_thread():  # no BLAS worker threads woken (and left spinning) by the dots
        return _total_norm(get_array_module(grads[0]), grads, norm_type)


def _total_norm(xp, grads, norm_type):
    """The norm of all gradients together, read back from the device once."""
    if norm_type == math.inf:
        return float(xp.stack([xp.abs(g).max() for g in grads]).max())
    if norm_type == 2:  # a dot product per gradient: one pass, no temporary
        parts = [xp.dot(g.ravel(), g.ravel()) for g in grads]
    else:
        parts = [xp.sum(xp.abs(g) ** norm_type) for g in grads]
    return float(xp.stack(parts).astype(xp.float64).sum()) ** (1.0 / norm_type)


# --- learning-rate schedules -------------------------------------------------------------
class LambdaLR:
    """lr = base_lr * lr_lambda(step) for every group; step() advances one step."""

    def __init__(self, optimizer, lr_lambda):
        self.optimizer = optimizer
        self.lr_lambda = lr_lambda
        self.base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        self.last_epoch = 0
        self._apply()

    def _apply(self):
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.lr_lambda(self.last_epoch)

    def step(self):
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        self.last_epoch = state["last_epoch"]
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def _warmup(step, num_warmup_steps):
    return step / max(1, num_warmup_steps)


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps):
    """Linear rise from 0 over the warmup steps, then linear decay to 0 at the last step."""
    def lr_lambda(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))
    return LambdaLR(optimizer, lr_lambda)


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, num_cycles=0.5):
    """Linear warmup, then a cosine decay from 1 to 0 (num_cycles=0.5: one half period)."""
    def lr_lambda(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))
    return LambdaLR(optimizer, lr_lambda)


def get_constant_schedule_with_warmup(optimizer, num_warmup_steps):
    """Linear warmup, then constant."""
    return LambdaLR(optimizer, lambda step: _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0)


SCHEDULES = {  # name -> (optimizer, warmup steps, total steps) -> schedule
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
    "constant": lambda optimizer, warmup, total: get_constant_schedule_with_warmup(optimizer, warmup),
}
