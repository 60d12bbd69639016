"""Checkpoint conversion: streaming safetensors IO (`checkpoint_io`), dense -> MoE upcycling (`upcycle`),
MoE-family key tables (`families`) and config mapping (`family_configs`), family <-> hf_moe folders
(`convert`). Import from the submodules; `hf_moe.upcycle` and `hf_moe.convert` are the public entry points."""
