"""MSA block-sparse GQA attention: `msa_attention` (Triton forward/backward) and its fp32 reference."""
from kernels.attention.op import msa_attention
from kernels.attention import reference

__all__ = ["msa_attention", "reference"]
