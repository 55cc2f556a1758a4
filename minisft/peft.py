"""The public name `minisft.peft`: the module `minisft.lean.peft` itself, under the name
that the README's examples and users' scripts import."""
import sys

from minisft.lean import peft

sys.modules[__name__] = peft
