"""The public name `minisft.functional`: the module `minisft.engine.functional` itself, under the name
that the README's examples and users' scripts import."""
import sys

from minisft.engine import functional

sys.modules[__name__] = functional
