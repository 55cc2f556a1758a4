"""The public name `minisft.optim`: the module `minisft.training.optim` itself, under the name
that the README's examples and users' scripts import."""
import sys

from minisft.training import optim

sys.modules[__name__] = optim
