"""Checkpoint conversion: the generic machinery (`tables`: key rules, named invertible ops, streaming converter,
source checks; `records`: the record format and its config mapping), one record per family
(`families/<model_type>.py`, found by the `families` registry), streaming safetensors IO (`checkpoint_io`),
family <-> hf_moe folders (`convert`) and dense -> MoE upcycling (`upcycle`, its recipe in `upcycle_recipe`).
`hf_moe.convert` and `hf_moe.upcycle` are the public entry points."""
