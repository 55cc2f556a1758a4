"""minisft: fine-tune pretrained BERT models on NumPy (or CuPy), without PyTorch."""
import os

# NumPy's OpenBLAS keeps its idle threads spinning for ~2^28 cycles after every matrix
# product, which takes the cores from minisft's own threads (minisft.parallel) between
# products. Ask it to sleep at once. OpenBLAS reads this when NumPy is first imported, so
# it applies when minisft is imported before NumPy (as its CLI does); set it yourself if not.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from minisft.backend import Device, cuda_available
from minisft.gradcheck import GradcheckError, gradcheck
from minisft.ops import cat, where
from minisft.parallel import get_num_threads, set_num_threads
from minisft.random import get_rng_state, manual_seed, set_rng_state
from minisft.tensor import Tensor, is_grad_enabled, no_grad, tensor

__version__ = "0.1.0"

__all__ = ["Device", "GradcheckError", "Tensor", "cat", "cuda_available", "get_num_threads",
           "get_rng_state", "gradcheck", "is_grad_enabled", "manual_seed", "no_grad",
           "set_num_threads", "set_rng_state", "tensor", "where"]
