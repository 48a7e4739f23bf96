"""Option sets that several models share, as base classes, and the towers they describe.

A model's options are its dataclass fields, base classes' first (``dpn-jax models`` lists them in
that order), so a base holds a model family's leading options: the embedding size and the tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from dpn_jax.data.schema import Schema
from dpn_jax.nn.dpn_tower import DPNTower
from dpn_jax.nn.mlp import MLP


class ProtocolModel(nn.Module):
    """Embedding 10 and the AFN/BARS protocol tower: 400-400-400, BatchNorm, ReLU, no dropout."""

    schema: Schema
    embedding_dim: int = 10
    hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9

    def tower(self, cls: type[MLP] = MLP, **fields: Any) -> MLP:
        """The tower of these options (``fields``: the tower class's other fields, its name)."""
        return cls(tuple(self.hidden), self.batch_norm, self.dropout, self.act, self.bn_momentum,
                   **fields)


class FeatureDPNModel(ProtocolModel):
    """The protocol model whose tower has feature DPO layers: :class:`~dpn_jax.nn.dpn_tower.DPNTower`."""

    dpo_layers: str = "first"
    context: str = "input"
    generator: str = "lowrank"
    rank: int = 4

    def dpn_tower(self, **generator: Any) -> DPNTower:
        """The DPN tower (``generator``: its other DPO options) in this module's own scope: its
        layers ``dpo_<i>``/``dense_<i>``/``bn_<i>`` stay at the model's top level, where saved
        models have them (so ``capture_intermediates`` records the tower's output under the
        model's ``__call__``, before the model's own)."""
        tower = self.tower(DPNTower, schema=self.schema, dpo_layers=self.dpo_layers,
                           context=self.context, generator=self.generator, rank=self.rank,
                           name="tower", **generator)
        nn.share_scope(self, tower)
        return tower


class BehaviourModel(nn.Module):
    """Embedding 10 and DIN's tower: 200-80 with Dice, no BatchNorm (layers ``mlp/dense_<i>``,
    ``bn_<i>``, ``act_<i>``)."""

    schema: Schema
    embedding_dim: int = 10
    hidden: Sequence[int] = (200, 80)
    act: str = "dice"
    batch_norm: bool = False
    dropout: float = 0.0
    bn_momentum: float = 0.9

    def tower(self) -> MLP:
        return MLP(tuple(self.hidden), self.batch_norm, self.dropout, self.act, self.bn_momentum,
                   layer_names=True, name="mlp")
