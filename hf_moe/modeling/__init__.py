"""The hf_moe model family: the reference model of the papers. Self-contained: only sibling imports, torch,
transformers and the standard library, so these files are exactly what a Hub repository carries as remote code.
Fast kernels live in hf_moe.kernels and reach the model only through the `kernel_hooks` seam."""
