"""Checkpoint conversion: streaming safetensors IO (`checkpoint_io`), dense -> MoE upcycling (`upcycle`) and
MoE-family key tables (`families`). Import from the submodules; `hf_moe.upcycle` is the public entry point."""
