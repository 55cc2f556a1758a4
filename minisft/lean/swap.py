"""How a pass puts a lean module in a plain one's place: the module's class becomes a
subclass of its own (as torch.nn.utils.parametrize does), so its parameters, submodules and
names stay, and `named_parameters()` still yields the checkpoint's keys."""

_MIXED = {}  # (mixin, class) -> their subclass
_PARTS = {}  # that subclass -> (mixin, class)


def swap_class(module, lean_class):
    """module's class becomes `lean_class`, a subclass of its plain class, under the mixins
    the module has (so passes may run in any order)."""
    mixins, cls = [], type(module)
    while cls in _PARTS:
        mixin, cls = _PARTS[cls]
        mixins.append(mixin)
    if not issubclass(lean_class, plain_class(cls)):
        raise TypeError(f"{lean_class.__name__} does not extend {type(module).__name__}")
    module.__class__ = lean_class
    for mixin in reversed(mixins):
        mix_in(module, mixin)
    return module


def mix_in(module, mixin):
    """module's class becomes mixin + its class (one subclass per pair, made once)."""
    cls = type(module)
    if not isinstance(module, mixin):
        if (mixin, cls) not in _MIXED:
            mixed = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
            _MIXED[mixin, cls], _PARTS[mixed] = mixed, (mixin, cls)
        module.__class__ = _MIXED[mixin, cls]
    return module


def plain_class(cls):
    """The first class in cls's method order that no pass made."""
    return next(c for c in cls.__mro__ if not c.__module__.startswith("minisft.lean"))
