"""Strategies: :class:`ForkJoinDDPStrategy` (also registered as ``strategy="fork_join_ddp"``).

Example:
    >>> from lightning.pytorch.strategies import StrategyRegistry
    >>> "fork_join_ddp" in StrategyRegistry
    True
"""

from lightning_supernet.strategies.fork_join import ForkJoinDDPStrategy

__all__ = ["ForkJoinDDPStrategy"]
