"""Lightning callbacks that set the supernet's training policy.

Example:
    >>> from lightning_supernet.callbacks import SandwichSampling, InplaceDistillation
    >>> [type(c).__name__ for c in (SandwichSampling(), InplaceDistillation())]
    ['SandwichSampling', 'InplaceDistillation']
"""

from lightning_supernet.callbacks.bn_recalibration import BNRecalibration, recalibrate_bn
from lightning_supernet.callbacks.distillation import InplaceDistillation
from lightning_supernet.callbacks.prioritization import ParameterPrioritization
from lightning_supernet.callbacks.sandwich import SandwichSampling

__all__ = ["BNRecalibration", "InplaceDistillation", "ParameterPrioritization", "SandwichSampling", "recalibrate_bn"]
