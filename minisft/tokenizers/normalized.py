"""Text rewritten with each character's span in the original kept, as the Rust tokenizers
library's NormalizedString keeps it, so that tokens of the rewritten text get offsets in the
text the user gave; and the normalisers of SentencePiece tokenizers over it.

A rewrite is a list of (character, change) over the whole text: change 0 takes the next
original character's span, +1 is an inserted character (the previous one's span), and -n
also drops the n original characters after it.

    text = Normalized.of("ﬁne", 0)
    Precompiled(charsmap).apply(text)      # text.chars == list("fine"), spans (0,1) (0,1) (1,2) (2,3)
"""
import base64
import re

from minisft.engine.errors import ModelFileError
from minisft.tokenizers import unicode
from minisft.tokenizers.graphemes import clusters
from minisft.tokenizers.sentencepiece import Charsmap


class Normalized:
    """chars: [str of one character]; spans: [(start, end)] in the original, per character."""

    def __init__(self, chars, spans):
        self.chars, self.spans = chars, spans

    @classmethod
    def of(cls, text, start):
        return cls(list(text), [(i, i + 1) for i in range(start, start + len(text))])

    def __str__(self):
        return "".join(self.chars)

    def rewrite(self, changes):
        """Apply [(character, change)] (see the module)."""
        chars, spans, i = [], [], 0
        for char, change in changes:
            if change > 0:
                span = self.spans[i - 1] if i > 0 else (0, 0)
            else:
                span = self.spans[i]
                i += 1 - change
            chars.append(char)
            spans.append(span)
        self.chars, self.spans = chars, spans

    def slice(self, start, stop):
        return Normalized(self.chars[start:stop], self.spans[start:stop])


def replaced(changes, old, new):
    """Add the changes that turn `old` (just consumed) into `new`: extra characters are
    insertions, missing ones are dropped after the last character written."""
    changes.extend((c, 0) for c in new)
    diff = len(new) - len(old)
    if diff > 0:
        for k in range(len(changes) - diff, len(changes)):
            changes[k] = (changes[k][0], 1)
    elif diff < 0 and changes:
        changes[-1] = (changes[-1][0], changes[-1][1] + diff)


class Precompiled:
    """SentencePiece's charsmap, walked grapheme by grapheme as the reference walks it: a
    cluster under 6 UTF-8 bytes is replaced whole when the map has a prefix of it, else each
    of its characters by its own entry."""

    def __init__(self, blob):
        self.charsmap = Charsmap(blob)

    def apply(self, text):
        transform, changes, modified = self.charsmap.transform, [], False
        for cluster in clusters(str(text)):
            if len(cluster.encode("utf-8")) < 6:
                norm = transform(cluster)
                if norm is not None:
                    replaced(changes, cluster, norm)
                    modified = True
                    continue
            for char in cluster:
                norm = transform(char)
                if norm is None:
                    changes.append((char, 0))
                else:
                    replaced(changes, char, norm)
                    modified = True
        if modified:
            text.rewrite(changes)


class Replace:
    """Each match of a literal string or regular expression replaced by `content`, whose
    characters take the span of the match's last character (the reference removes the match,
    then inserts after it)."""

    def __init__(self, pattern, content):
        self.pattern = re.compile(pattern["Regex"]) if "Regex" in pattern else re.compile(re.escape(pattern["String"]))
        self.content = content

    def apply(self, text):
        chars, spans, position = [], [], 0
        for match in self.pattern.finditer(str(text)):
            chars += text.chars[position:match.start()]
            spans += text.spans[position:match.start()]
            if match.end() > match.start():
                chars += list(self.content)
                spans += [text.spans[match.end() - 1]] * len(self.content)
            position = match.end()
        text.chars, text.spans = chars + text.chars[position:], spans + text.spans[position:]


class Strip:
    """Whitespace removed from the left and/or right end."""

    def __init__(self, left=True, right=True):
        self.left, self.right = left, right

    def apply(self, text):
        source, spaces = str(text), unicode.whitespace()
        start = len(source) - len(source.lstrip(spaces)) if self.left else 0
        stop = len(source.rstrip(spaces)) if self.right else len(source)
        text.chars, text.spans = text.chars[start:max(start, stop)], text.spans[start:max(start, stop)]


class Lowercase:
    """Each character lowercased (one may become several: "İ" -> "i̇")."""

    def apply(self, text):
        changes = []
        for char in text.chars:
            replaced(changes, char, char.lower())
        text.rewrite(changes)


class Prepend:
    """`prepend` added before non-empty text, aligned with its first character."""

    def __init__(self, prepend):
        self.prepend = prepend

    def apply(self, text):
        if text.chars:
            text.chars[:0] = list(self.prepend)
            text.spans[:0] = [text.spans[0]] * len(self.prepend)


def normalizers(spec, source):
    """tokenizer.json's "normalizer" as a list of the above (None: none)."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [n for part in spec["normalizers"] for n in normalizers(part, source)]
    if kind == "Precompiled":
        return [Precompiled(base64.b64decode(spec["precompiled_charsmap"]))] if spec.get("precompiled_charsmap") else []
    if kind == "Replace":
        return [Replace(spec["pattern"], spec["content"])]
    if kind == "Strip":
        return [Strip(spec.get("strip_left", True), spec.get("strip_right", True))]
    if kind == "Prepend":
        return [Prepend(spec["prepend"])]
    if kind == "Lowercase":
        return [Lowercase()]
    raise ModelFileError(f"{source}: field 'normalizer' has type {kind!r}; minisft's SentencePiece tokenizers read "
                     "Sequence, Precompiled, Replace, Strip, Prepend and Lowercase")
