"""Train state, optimiser and the pure train/eval steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from dpn_jax.errors import ConfigError
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.lazy_adam import lazy_adam
from dpn_jax.train.optimizer import Optimizer, learning_rate, with_learning_rate

EMBEDDING_PARAMS = ("table", "numeric")  # parameter names owned by FieldEmbedding


class TrainState(struct.PyTreeNode):
    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jnp.ndarray  # dropout key; folded with the step so each step differs


OPTIMIZERS = ("adam", "lazy_adam")


def make_optimizer(cfg: TrainConfig, *, clip_as_data: bool = False) -> Optimizer:
    """Adam with the learning rate as data (``inject_hyperparams``) so reduce-on-plateau and
    sweeps change it without recompiling; ``cfg.optimizer="lazy_adam"`` updates only the
    embedding rows each batch uses (:mod:`dpn_jax.train.lazy_adam`).

    ``clip_as_data`` (sweeps): always chain a clip whose threshold is data too, ``inf`` when
    ``cfg.grad_clip`` is 0, so replicas with and without clipping share one program; below the
    threshold the clip returns the gradient unchanged, so the updates equal the unclipped ones."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--set optimizer={cfg.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.optimizer == "lazy_adam":
        return lazy_adam(cfg.lr, cfg.grad_clip, clip_as_data=clip_as_data, kernel=cfg.lazy_adam_kernel)
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=cfg.lr)
    if clip_as_data:
        clip = optax.inject_hyperparams(optax.clip_by_global_norm)(
            max_norm=cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        return Optimizer.dense(optax.chain(clip, adam))
    if cfg.grad_clip > 0:
        return Optimizer.dense(optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam))
    return Optimizer.dense(adam)


def get_lr(state: TrainState) -> float:
    return float(learning_rate(state.opt_state))


def set_lr(state: TrainState, lr: float) -> TrainState:
    return state.replace(opt_state=with_learning_rate(state.opt_state, lr))


def make_init_fn(model: nn.Module) -> Callable[[jax.Array, dict], Any]:
    """Jitted ``(key, batch) -> variables``; reuse one for many seeds to compile it once."""
    return jax.jit(lambda k, b: model.init({"params": k}, b, train=False))


def init_state(model: nn.Module, example_batch: dict, cfg: TrainConfig,
               tx: Optimizer, init_fn: Callable | None = None) -> TrainState:
    # Initialisation draws with the "rbg" generator: on the CPU its programs compile about twice
    # as fast as threefry's (initialisation runs once, compilation dominates); dropout keeps
    # threefry, which runs faster per step there.
    init_key = jax.random.key(cfg.seed, impl="rbg")
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    variables = (init_fn or make_init_fn(model))(init_key, example_batch)
    params = variables["params"]
    if cfg.dense_init == "xavier_normal":
        params = xavier_normal_dense(params, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2))
    batch_stats = variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=dropout_key)


def xavier_normal_dense(params, key: jax.Array):
    """Every 2-D ``kernel`` (a Dense layer's ``[fan_in, fan_out]``) redrawn from
    N(0, 2 / (fan_in + fan_out)), untruncated, as PyTorch's ``xavier_normal_``; everything else
    (biases, embeddings, BatchNorm, generator tensors) kept."""
    draw = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if getattr(path[-1], "key", None) == "kernel" and leaf.ndim == 2:
            leaf = draw(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def _l2(params, names: tuple[str, ...]) -> jnp.ndarray:
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if getattr(path[-1], "key", None) in names:
            total = total + jnp.sum(jnp.square(leaf))
    return total


def bce_with_logits(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    return optax.sigmoid_binary_cross_entropy(logits, labels)


AUX_LOSSES = "losses"


def aux_loss(updates: dict) -> jnp.ndarray:
    """The sum of the scalars a model sowed into the ``"losses"`` collection in train mode.

    A model with an auxiliary objective (DIEN's next-behaviour loss) calls
    ``self.sow("losses", name, weight * value)``; the train step adds it to the data loss (the
    reported loss stays the data loss).  Models that sow nothing add exactly zero."""
    leaves = jax.tree.leaves(updates.get(AUX_LOSSES, {}))
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


REGULARIZERS = {"embedding_l2": EMBEDDING_PARAMS, "net_l2": ("kernel",)}
NONFINITE_MODES = ("stop", "skip")


def _tree_finite(tree) -> jnp.ndarray:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def regularizer_coefficients(cfg: TrainConfig) -> dict[str, float]:
    """The L2 terms ``cfg`` switches on, as ``{name: coefficient}``."""
    return {k: getattr(cfg, k) for k in REGULARIZERS if getattr(cfg, k) > 0}


def make_train_step(model: nn.Module, cfg: TrainConfig, tx: Optimizer, *,
                    regularizers_as_data: bool = False) -> Callable[..., tuple[TrainState, jnp.ndarray]]:
    """Pure ``(state, batch) -> (state, loss)``; jit it with ``donate_argnums=0``. Every optimiser
    takes one path (:mod:`dpn_jax.train.optimizer`): lookup, gradient, update, apply_updates.

    With ``regularizers_as_data`` (sweeps) the step is ``(state, batch, coefs) -> ...`` where
    ``coefs`` maps ``embedding_l2``/``net_l2`` to arrays, so replicas with different L2 share one
    program (a zero coefficient adds exactly zero to the loss and its gradient).

    ``cfg.on_nonfinite="skip"``: a step whose loss or gradients are non-finite returns the state
    unchanged (step included), selected on the device so it costs no host synchronisation."""
    if cfg.on_nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"--set on_nonfinite={cfg.on_nonfinite}: choose one of {', '.join(NONFINITE_MODES)}")
    static_coefs = regularizer_coefficients(cfg)

    def loss_fn(params, batch_stats, batch, rng, coefs, net):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, updates = net.apply(variables, batch, train=True, rngs={"dropout": rng},
                                      mutable=["batch_stats", AUX_LOSSES])
        data_loss = jnp.mean(bce_with_logits(logits, batch["label"]))
        loss = data_loss + aux_loss(updates)
        for name, coef in coefs.items():
            loss = loss + coef * _l2(params, REGULARIZERS[name])
        return loss, (data_loss, updates.get("batch_stats", batch_stats))

    def step(state: TrainState, batch: dict, coefs) -> tuple[TrainState, jnp.ndarray]:
        rng = jax.random.fold_in(state.rng, state.step)
        net, params, batch, extra = tx.lookup(model, state.params, batch)
        (loss, (data_loss, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state.batch_stats, batch, rng, coefs, net)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = tx.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
        if cfg.on_nonfinite == "skip":
            ok = jnp.isfinite(loss) & _tree_finite(grads)
            new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        return new, data_loss

    if regularizers_as_data:
        return step

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, jnp.ndarray]:
        return step(state, batch, static_coefs)

    return train_step


def make_predict(model: nn.Module) -> Callable[[Any, Any, dict], jnp.ndarray]:
    """Pure ``(params, batch_stats, batch) -> logits`` in inference mode."""

    def predict(params, batch_stats, batch):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        return model.apply(variables, batch, train=False)

    return predict
