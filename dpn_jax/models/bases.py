"""Option sets that several models share, as base classes, and the towers they describe.

A model's options are its dataclass fields in dataclass order (``dpn-jax models`` lists them so):
the bases' fields from the last base listed to the first, then the class's own. So a base that
holds a family's trailing options (the tower's) is listed first: ``class DCN(ProtocolTower,
CrossNetModel)`` has CrossNet's options, then the tower's, then its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from dpn_jax.data.schema import Schema
from dpn_jax.nn.dpn_tower import DPNTower
from dpn_jax.nn.mlp import MLP


class ProtocolTower(nn.Module):
    """The AFN/BARS protocol tower's options: 400-400-400, BatchNorm, ReLU, no dropout. Listed
    before a model's other base class, its options follow that base's (``dcn``: CrossNet's)."""

    hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9

    def tower(self, cls: type[MLP] = MLP, **fields: Any) -> MLP:
        """The tower of these options (``fields``: the tower class's other fields, its name)."""
        return cls(tuple(self.hidden), self.batch_norm, self.dropout, self.act, self.bn_momentum,
                   **fields)


class EmbeddingModel(nn.Module):
    """A model's first options: the dataset's schema and the embedding size (the protocol's 10)."""

    schema: Schema
    embedding_dim: int = 10


class ProtocolModel(ProtocolTower, EmbeddingModel):
    """Embedding 10 and the protocol tower."""


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
