"""The library's random state: one seeded generator per device.

Every random draw minisft makes (dropout masks, weight initialisation, shuffling) comes from
`generator(device)`, so `manual_seed(s)` makes a run reproducible. Like torch, the default
seed is fixed, not drawn from the clock.
"""
import numpy

from minisft.engine.backend import Device
from minisft.engine.runtime import for_blocks

_DEFAULT_SEED = 67280421310721
_seed = _DEFAULT_SEED
_generators = {}


def manual_seed(seed):
    """Reseed every device's generator."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def initial_seed():
    return _seed


def generator(device="cpu"):
    """The generator for `device`: numpy.random.Generator, or cupy's on a GPU."""
    device = Device(device)
    if device not in _generators:
        if device.type == "cpu":
            _generators[device] = numpy.random.default_rng(_seed)
        else:
            with device.xp.cuda.Device(device.index):
                _generators[device] = device.xp.random.default_rng(_seed)
    return _generators[device]


def keep_mask(shape, p, device="cpu"):
    """A boolean array, True with probability 1 - p: which elements dropout keeps.

    On the CPU it compares 16 random bits per element (a quarter of one raw 64-bit draw)
    with round(p * 65536), three times as fast as drawing floats; p is then exact to
    1/65536. Large masks are drawn in blocks on minisft's threads, each from a copy of the
    generator advanced to the block's first draw: the same bits as one sequential draw.
    """
    device = Device(device)
    rng = generator(device)
    if device.type != "cpu":
        return rng.random(shape, dtype=numpy.float32) >= p
    count = int(numpy.prod(shape))
    mask = numpy.empty(count, dtype=bool)
    state, threshold = rng.bit_generator.state, round(p * 65536)

    def block(start, stop):  # draws [start, stop), elements [4 start, 4 stop)
        bit_generator = type(rng.bit_generator)()
        bit_generator.state = state
        bit_generator.advance(start)
        bits = bit_generator.random_raw(stop - start).view(numpy.uint16)
        piece = mask[4 * start:4 * stop]
        numpy.greater_equal(bits[:piece.size], threshold, out=piece)

    draws = (count + 3) // 4
    for_blocks(block, draws, row_elements=4)
    rng.bit_generator.advance(draws)
    return mask.reshape(shape)


def get_rng_state():
    """The CPU generator's state (seed and position), for exact resume."""
    return {"seed": _seed, "cpu": generator("cpu").bit_generator.state}


def set_rng_state(state):
    manual_seed(state["seed"])
    generator("cpu").bit_generator.state = state["cpu"]
