"""The public name `minisft.viz`: the module `minisft.inspect.viz` itself, under the name
that the README's examples and users' scripts import."""
import sys

from minisft.inspect import viz

sys.modules[__name__] = viz
