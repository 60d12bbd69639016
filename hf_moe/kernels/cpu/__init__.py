"""CPU kernels: autograd Functions with hand-written backwards for the reference model's hot spots (attention,
MLA attention, RMSNorm, RoPE, SwiGLU, LM head + loss), the fp32 GEMM setting (`gemm`) and scratch memory
(`scratch`). Each module's `*_kernel` function is what `hf_moe.kernels.register_kernels` puts into the seam."""
