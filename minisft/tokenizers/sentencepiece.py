"""SentencePiece's files, read without the sentencepiece package: the model file (spm.model,
sentencepiece.bpe.model: a protobuf ModelProto) and its precompiled normalisation charsmap
(a double-array trie of the character sequences it rewrites, and their replacements).

    proto = read_model(path)          # {"pieces": [(piece, score, type)], "trainer": {...}, "normalizer": {...}}
    Charsmap(proto["normalizer"]["precompiled_charsmap"]).transform("ﬁ") == "fi"
"""
import struct

from minisft.engine.errors import ModelFileError

# sentencepiece_model.proto's field numbers, and the piece types
_PIECE = {1: "piece", 2: "score", 3: "type"}
_TRAINER = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
_NORMALIZER = {1: "name", 2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
               5: "escape_whitespaces"}
PIECE_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _fields(data, path):
    """(field number, wire type, value) of one protobuf message: varints as int, 32-bit as
    bytes, length-delimited as bytes."""
    i, size = 0, len(data)

    def varint():
        nonlocal i
        value = shift = 0
        while True:
            if i >= size:
                raise ModelFileError(f"{path}: truncated protobuf (a varint runs past the end): not a "
                                     "SentencePiece model, or damaged; get the file again")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value
    while i < size:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, wire, data[i:i + width]
            i += width
        elif wire == 2:
            length = varint()
            if i + length > size:
                raise ModelFileError(f"{path}: truncated protobuf (field {number} runs past the end); get the "
                                     "file again")
            yield number, wire, data[i:i + length]
            i += length
        else:
            raise ModelFileError(f"{path}: protobuf wire type {wire} (field {number}) is not SentencePiece's; "
                                 "not a SentencePiece model")


def _message(data, names, path):
    """{name: value} of the named fields of one message (others skipped)."""
    out = {}
    for number, wire, value in _fields(data, path):
        if number not in names:
            continue
        if wire == 5:
            value = struct.unpack("<f", value)[0]
        elif wire == 2 and names[number] not in ("precompiled_charsmap",):
            value = value.decode("utf-8")
        out[names[number]] = value
    return out


def read_model(path):
    """{"pieces": [(piece, score, type name)], "trainer": {...}, "normalizer": {...}} of a
    SentencePiece model file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: a SentencePiece tokenizer needs its model file") from None
    pieces, trainer, normalizer = [], {}, {}
    try:
        for number, wire, value in _fields(data, path):
            if number == 1 and wire == 2:
                piece = _message(value, _PIECE, path)
                pieces.append((piece.get("piece", ""), float(piece.get("score", 0.0)),
                               PIECE_TYPES.get(piece.get("type", 1), "normal")))
            elif number == 2 and wire == 2:
                trainer = _message(value, _TRAINER, path)
            elif number == 3 and wire == 2:
                normalizer = _message(value, _NORMALIZER, path)
    except UnicodeDecodeError:
        raise ModelFileError(f"{path}: a piece is not UTF-8: not a SentencePiece model, or damaged") from None
    if not pieces:
        raise ModelFileError(f"{path}: no pieces: not a SentencePiece model file")
    trainer["model_type"] = MODEL_TYPES.get(trainer.get("model_type", 1), "unigram")
    return {"pieces": pieces, "trainer": trainer, "normalizer": normalizer}


class Charsmap:
    """SentencePiece's precompiled charsmap: a uint32 trie size, the trie (darts-clone's double
    array, one uint32 unit per node) over UTF-8 bytes, whose values index a pool of
    NUL-terminated replacement strings."""

    def __init__(self, blob):
        (trie_bytes,) = struct.unpack("<I", blob[:4])
        self.units = struct.unpack(f"<{trie_bytes // 4}I", blob[4:4 + trie_bytes])
        self.pool = blob[4 + trie_bytes:]
        self._cache = {}

    def _first_match(self, key):
        """The value of the shortest key prefix in the trie, or None (darts-clone's common
        prefix search, stopped at its first result)."""
        units = self.units
        unit = units[0]
        node = (unit >> 10) << ((unit & (1 << 9)) >> 6)
        for byte in key:
            node ^= byte
            if node >= len(units):
                return None
            unit = units[node]
            if unit & ((1 << 31) | 0xFF) != byte:
                return None
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                return units[node] & ((1 << 31) - 1)
        return None

    def transform(self, chunk):
        """The replacement of `chunk` (str) by its shortest prefix in the map, or None."""
        if chunk not in self._cache:
            value = self._first_match(chunk.encode("utf-8"))
            self._cache[chunk] = None if value is None else \
                self.pool[value:self.pool.index(b"\0", value)].decode("utf-8")
        return self._cache[chunk]
