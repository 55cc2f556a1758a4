"""Tokenizers that give transformers' ids: the Unicode rules of its Rust tokenizers (unicode,
unicode_tables), the shared encoding of texts and pairs (encoding), WordPiece (wordpiece) and
byte-level BPE (bpe)."""
