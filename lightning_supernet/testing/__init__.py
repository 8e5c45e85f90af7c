"""Testing utilities: the conformance contract (issue 9) and the model zoos it runs over.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.testing import check_conformance
    >>> check_conformance(lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
    ...                   torch.randn(3, 4), n_random=1).outcome
    'PASS'
"""

from lightning_supernet.testing.conformance import MODES, check_conformance, disable_dropout, model_fingerprint, run_in_mode
from lightning_supernet.testing.report import OUTCOMES, Report, summarize

__all__ = ["MODES", "OUTCOMES", "Report", "check_conformance", "disable_dropout", "model_fingerprint",
           "run_in_mode", "summarize"]
