"""Slices of rows: how the lean ops go through an array a part at a time."""


def slices(length, size):
    """range(length) in slices of `size` (the last one may be shorter)."""
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]
