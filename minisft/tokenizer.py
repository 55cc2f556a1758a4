"""The public name `minisft.tokenizer`: the module `minisft.tokenizers.wordpiece` itself, under the name
that the README's examples and users' scripts import."""
import sys

from minisft.tokenizers import wordpiece

sys.modules[__name__] = wordpiece
