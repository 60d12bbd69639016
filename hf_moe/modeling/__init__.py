"""The hf_moe model family. Self-contained: only sibling imports, torch and transformers, so these files are
exactly what a Hub repository carries as remote code."""
