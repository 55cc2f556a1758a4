"""minisft side by side with PyTorch + transformers. Run `python -m benchmarks`."""
