"""How a pass puts a lean module in a plain one's place: the module's class becomes a
subclass of its own (as torch.nn.utils.parametrize does), so its parameters, submodules and
names stay, and `named_parameters()` still yields the checkpoint's keys."""

_MIXED = {}  # (mixin, class) -> their subclass


def swap_class(module, lean_class):
    """module's class becomes `lean_class`, a subclass of its class or of its plain class."""
    if not issubclass(lean_class, plain_class(type(module))):
        raise TypeError(f"{lean_class.__name__} does not extend {type(module).__name__}")
    module.__class__ = lean_class
    return module


def mix_in(module, mixin):
    """module's class becomes mixin + its class (one subclass per pair, made once)."""
    cls = type(module)
    if not isinstance(module, mixin):
        if (mixin, cls) not in _MIXED:
            _MIXED[mixin, cls] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
        module.__class__ = _MIXED[mixin, cls]
    return module


def plain_class(cls):
    """The first class in cls's method order that no pass made."""
    return next(c for c in cls.__mro__ if not c.__module__.startswith("minisft.lean"))
