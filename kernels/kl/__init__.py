"""MSA KL alignment loss: `msa_kl_loss` (Triton forward/backward) and its fp32 reference."""
from kernels.kl.op import msa_kl_loss
from kernels.kl import reference

__all__ = ["msa_kl_loss", "reference"]
