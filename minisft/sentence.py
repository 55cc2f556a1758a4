"""The public name `minisft.sentence`: the module `minisft.models.sentence` itself, under the name
that the README's examples and users' scripts import."""
import sys

from minisft.models import sentence

sys.modules[__name__] = sentence
