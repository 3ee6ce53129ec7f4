"""lockgen: reproducible CUDA + PyTorch environments from a compatibility matrix."""
