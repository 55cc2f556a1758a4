"""The engine: arrays on a device (backend), process-wide settings (runtime), random draws,
Tensor and its reverse-mode graph (tensor), the primitive ops (ops), the differentiable ops
(functional), mixed precision (amp) and the finite-difference check (gradcheck)."""
