"""Files: checkpoint weights in (safetensors, torch's pytorch_model.bin) and out (weights),
and writes that never leave half a file (atomic)."""
