"""MSA block selection (index branch): `msa_select` and its fp32 reference."""
from kernels.select.budget import BUDGETS, Budget
from kernels.select.op import msa_select
from kernels.select import reference

__all__ = ["msa_select", "reference", "Budget", "BUDGETS"]
