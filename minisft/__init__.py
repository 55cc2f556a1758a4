"""minisft: fine-tune pretrained BERT models on NumPy (or CuPy), without PyTorch."""
from minisft.engine.backend import Device, cuda_available
from minisft.engine.gradcheck import GradcheckError, gradcheck
from minisft.engine.ops import cat, where
from minisft.engine.random import get_rng_state, manual_seed, set_rng_state
from minisft.engine.runtime import get_num_threads, set_num_threads
from minisft.engine.tensor import Tensor, is_grad_enabled, no_grad, tensor
from minisft.kernels import get_kernels, set_kernels

__version__ = "0.1.0"

__all__ = ["Device", "GradcheckError", "Tensor", "cat", "cuda_available", "get_num_threads",
           "get_kernels", "get_rng_state", "gradcheck", "is_grad_enabled", "manual_seed", "no_grad",
           "set_kernels", "set_num_threads", "set_rng_state", "tensor", "where"]
