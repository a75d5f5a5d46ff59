"""Optimizers: SGD (momentum, Nesterov, weight decay) and Adam, with PyTorch's update rules.

Each takes the list from model.parameters(), updates Parameter.data in place on step() (so a model and its
optimizer keep sharing the arrays) and clears the accumulated gradients on zero_grad(). state_dict() returns the
hyper-parameters and slot arrays that a training checkpoint stores, so training resumes exactly.

step() updates every parameter in one compiled call and one parallel pass (engine.sgd_step / adam_step) when the
parameters, gradients and slots are contiguous arrays of one float dtype, as a model's are; otherwise, and with
`fused = False`, it runs the same rules as NumPy expressions per parameter (`_update`). The two agree within float
rounding (the compiled pass may fuse a multiply and an add); the compiled one gives the same bits for any thread
count.
"""
import math

import numpy as np

from . import functional as _F
from ._kernels import engine as _engine
from .layers import Parameter

__all__ = ["Optimizer", "SGD", "Adam"]


def _number(value, name, minimum=0.0, maximum=math.inf, open_max=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if not (minimum <= value <= maximum) or (open_max and value == maximum):
        raise ValueError(f"{name} must be in [{minimum}, {maximum}{')' if open_max else ']'}, got {value}")
    return value


def _threads_for(arrays):
    return _F._threads_for(sum(a.size for a in arrays), _F._SERIAL_ELEMENTS)


class Optimizer:
    _slots = ()
    fused = True     # step() in one compiled pass where the arrays allow it (see the module's docstring)

    def __init__(self, params, lr):
        params = list(params)
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}] must be a convengine Parameter, got {type(p).__name__}")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears twice in the optimizer's list")
        self.params = params
        self.lr = lr
        self.steps = 0
        self.state = {slot: [np.zeros_like(p.data) for p in params] for slot in self._slots}

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _number(value, "lr")

    def zero_grad(self):
        for p in self.params:
            if p.grad is None or p.grad.shape != p.data.shape or p.grad.dtype != p.data.dtype:
                p.grad = np.zeros_like(p.data)
            else:
                p.grad.fill(0)

    def step(self):
        self.steps += 1
        flat = self._flat_arrays() if self.fused else None
        if flat is not None:
            try:
                self._fused_step(*flat)     # checks everything before it writes anything
            except BaseException:
                self.steps -= 1
                raise
            return
        for i, p in enumerate(self.params):
            self._update(i, p)

    def _flat_arrays(self):
        """(1-D views of the parameters, of their gradients, {slot: 1-D views}, dtype) when every array is
        contiguous, writable, of the parameters' one float dtype and of its parameter's shape; else None."""
        dtype = self.params[0].data.dtype
        if dtype not in (np.float32, np.float64):
            return None

        def flat(a, shape):
            if (not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous
                    or not a.flags.writeable or not a.flags.aligned):
                return None
            return a.reshape(-1)

        params, grads = [], []
        for p in self.params:
            params.append(flat(p.data, p.data.shape))
            grads.append(flat(p.grad, p.data.shape))
        slots = {slot: [flat(a, p.data.shape) for a, p in zip(arrays, self.params)]
                 for slot, arrays in self.state.items()}
        if any(a is None for a in params + grads) or any(a is None for v in slots.values() for a in v):
            return None
        return params, grads, slots, dtype

    def _fused_step(self, params, grads, slots, dtype):
        raise NotImplementedError

    def _update(self, i, p):
        raise NotImplementedError

    def hyperparameters(self):
        raise NotImplementedError

    def state_dict(self):
        """(JSON-serialisable description, {key: array}) of everything step() depends on."""
        desc = {"type": type(self).__name__, "hyperparameters": self.hyperparameters(), "steps": self.steps,
                "shapes": [list(p.data.shape) for p in self.params]}
        arrays = {f"{slot}/{i}": a for slot, slots in self.state.items() for i, a in enumerate(slots)}
        return desc, arrays

    def load_state_dict(self, desc, arrays):
        """Restore what state_dict() returned; a state of another optimizer or other parameters is a ValueError."""
        if not isinstance(desc, dict) or desc.get("type") != type(self).__name__:
            found = desc.get("type") if isinstance(desc, dict) else desc
            raise ValueError(f"optimizer state is for {found!r}, not {type(self).__name__}")
        shapes = desc.get("shapes")
        if shapes != [list(p.data.shape) for p in self.params]:
            raise ValueError(f"optimizer state is for parameters of shapes {shapes}, this optimizer has "
                             f"{[list(p.data.shape) for p in self.params]}")
        hyper = desc.get("hyperparameters")
        steps = desc.get("steps")
        if not isinstance(hyper, dict) or set(hyper) != set(self.hyperparameters()):
            raise ValueError(f"optimizer hyperparameters {hyper!r} do not fit {type(self).__name__}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"optimizer step count must be an int >= 0, got {steps!r}")
        backup = self.hyperparameters(), self.state, self.steps
        try:
            self._set_hyperparameters(hyper)
        except (TypeError, ValueError) as e:
            self._restore(backup)
            raise ValueError(f"bad optimizer hyperparameters {hyper!r}: {e}") from None
        new_state = {}
        try:
            for slot in self._slots:
                new_state[slot] = []
                for i, p in enumerate(self.params):
                    a = arrays.get(f"{slot}/{i}")
                    if a is None or a.shape != p.data.shape or a.dtype != p.data.dtype:
                        raise ValueError(f"optimizer slot {slot}/{i} is missing or does not match parameter "
                                         f"{p.name} ({p.data.shape}, {p.data.dtype})")
                    new_state[slot].append(np.array(a))
        except ValueError:
            self._restore(backup)
            raise
        self.state = new_state
        self.steps = steps

    def _restore(self, backup):
        self._set_hyperparameters(backup[0])
        self.state, self.steps = backup[1], backup[2]

    def _set_hyperparameters(self, hyper):
        # The constructor validates; it also resets the slots and step count, which the caller then sets.
        type(self).__init__(self, self.params, **hyper)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent: v = momentum * v + (g + weight_decay * w); w -= lr * v, or with Nesterov
    w -= lr * (g + weight_decay * w + momentum * v). momentum=0 is the article's w = w - lr * dL/dW."""

    _slots = ("momentum",)

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.momentum = _number(momentum, "momentum")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.weight_decay = _number(weight_decay, "weight_decay")
        self._slots = ("momentum",) if self.momentum else ()
        super().__init__(params, lr)

    def _update(self, i, p):
        g = p.grad
        if self.weight_decay:
            g = g + p.data * p.data.dtype.type(self.weight_decay)
        if self.momentum:
            v = self.state["momentum"][i]
            v *= p.data.dtype.type(self.momentum)
            v += g
            g = g + v * p.data.dtype.type(self.momentum) if self.nesterov else v
        p.data -= g * p.data.dtype.type(self.lr)

    def _fused_step(self, params, grads, slots, dtype):
        hyper = np.array([self.lr, self.momentum, self.weight_decay], dtype)
        _engine.sgd_step(params, grads, slots.get("momentum"), hyper, self.nesterov, _threads_for(params))

    def hyperparameters(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction; weight_decay adds weight_decay * w to the gradient (L2, as
    torch.optim.Adam, not AdamW)."""

    _slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        self.betas = (_number(betas[0], "betas[0]", 0.0, 1.0, True), _number(betas[1], "betas[1]", 0.0, 1.0, True))
        self.eps = _number(eps, "eps")
        self.weight_decay = _number(weight_decay, "weight_decay")
        super().__init__(params, lr)

    def _update(self, i, p):
        dt = p.data.dtype.type
        b1, b2 = self.betas
        g = p.grad
        if self.weight_decay:
            g = g + p.data * dt(self.weight_decay)
        m = self.state["exp_avg"][i]
        v = self.state["exp_avg_sq"][i]
        m *= dt(b1)
        m += g * dt(1 - b1)
        v *= dt(b2)
        v += g * g * dt(1 - b2)
        correction1 = 1 - b1 ** self.steps
        correction2 = 1 - b2 ** self.steps
        denom = np.sqrt(v) / dt(math.sqrt(correction2)) + dt(self.eps)
        p.data -= m / denom * dt(self.lr / correction1)

    def _fused_step(self, params, grads, slots, dtype):
        b1, b2 = self.betas
        correction1 = 1 - b1 ** self.steps
        correction2 = 1 - b2 ** self.steps
        hyper = np.array([self.lr / correction1, b1, 1 - b1, b2, 1 - b2, math.sqrt(correction2), self.eps,
                          self.weight_decay], dtype)
        _engine.adam_step(params, grads, slots["exp_avg"], slots["exp_avg_sq"], hyper, _threads_for(params))

    def hyperparameters(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

