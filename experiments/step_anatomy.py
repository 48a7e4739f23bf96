"""Where the DNN train step's time goes on this CPU, JAX beside PyTorch, part by part.

    python experiments/step_anatomy.py --out experiments/results/step_anatomy_cpu.md

Issue 7 asks for `dnn` at 2x FuxiCTR's samples/s on the Criteo shape (batch 4096, 39 fields x
10, MLP 400-400-400 with BatchNorm). This script times the parts of that step separately, each
the median of ``--steps`` calls after a warm-up, the JAX and PyTorch variants of a part
interleaved round by round (``--rounds``) so other load hits both alike:

- the three matmul shapes of one hidden layer: forward ``x @ W``, input gradient ``g @ Wᵀ`` and
  weight gradient ``xᵀ @ g`` (4096 x 400 x 400), fp32 and bf16 (fp32 accumulation);
- the MLP 390-400-400-400-1 forward + backward with and without BatchNorm, fp32, and with bf16
  matmuls (JAX: bf16 operands with fp32 accumulation in a custom VJP, also with the weight
  gradient reading a row-major ``xᵀ`` (``with_layout_constraint``); PyTorch: CPU autocast);
- the same bf16 products and MLP by MKL (``matmul_dtype=bfloat16_mkl``, rows ending in MKL,
  beside PyTorch's bf16 times) when the ``mkl`` wheel and a C++ compiler are here;
- the embedding part: gather of 4096 x 39 rows of the 1M x 10 table, forward + the dense
  gradient (zero fill + scatter-add), and one dense Adam update of the table.

Rows give ms per call and, for matmuls, GFLOP/s. Written with the command, the CPU model, the
versions and ``XLA_FLAGS`` (importing dpn_jax turns XLA:CPU's YNNPACK dots off, see
dpn_jax/xla_flags.py; ``DPN_JAX_XLA_DEFAULTS=0`` keeps XLA's own default).
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpn_jax.benchmark.harness import cpu_model
from dpn_jax.nn import mkl_matmul
from dpn_jax.nn.precision import bf16_matmul, mkl_bf16_matmul, row_major_transpose
from dpn_jax.runner import versions

B, D_IN, H, VOCAB, FIELDS, DIM = 4096, 390, 400, 1_000_000, 39, 10
BF16 = jnp.bfloat16
# rows of matmul_dtype=bfloat16_mkl's products when MKL and a compiler are here
MKL = " MKL" if mkl_matmul.unavailable_reason() is None else ""


def timed(fn: Callable[[], object], steps: int) -> float:
    """Median ms of ``steps`` calls of ``fn`` (which blocks until its result is ready)."""
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


@jax.custom_vjp
def bf16_matmul_folded(x, w):
    """:func:`dpn_jax.nn.precision.bf16_matmul` with XLA's own (folded) transpose in the weight
    gradient: the variant the library's row-major ``xᵀ`` is measured against."""
    return jnp.dot(x.astype(BF16), w.astype(BF16), preferred_element_type=jnp.float32)


def _folded_fwd(x, w):
    xb, wb = x.astype(BF16), w.astype(BF16)
    return jnp.dot(xb, wb, preferred_element_type=jnp.float32), (xb, wb)


def _folded_bwd(res, g):
    xb, wb = res
    gb = g.astype(BF16)
    return (jnp.dot(gb, wb.T, preferred_element_type=jnp.float32),
            jnp.dot(xb.T, gb, preferred_element_type=jnp.float32))


bf16_matmul_folded.defvjp(_folded_fwd, _folded_bwd)


def jax_mlp_loss(ws, x, y, matmul, batch_norm: bool):
    for w in ws[:-1]:
        h = matmul(x, w)
        if batch_norm:
            mean = h.mean(0)
            h = (h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(0) + 1e-5)
        x = jax.nn.relu(h)
    z = (x @ ws[-1])[:, 0]
    return optax.sigmoid_binary_cross_entropy(z, y).mean()


def jax_parts() -> dict[str, tuple[Callable[[], object], float]]:
    """name -> (a call that blocks, its FLOPs or 0)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(H, H)) * 0.05, jnp.float32)
    mm = 2.0 * B * H * H
    parts = {}
    for dtype, name in ((jnp.float32, "fp32"), (BF16, "bf16")):
        def dot(a, b, dims, dtype=dtype):
            return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())),
                                       preferred_element_type=jnp.float32)
        # dot bound as a default: each dtype's lambdas keep their own (traced at the first call)
        for label, fn, args in (("x @ W", lambda a, b, dot=dot: dot(a, b, ((1,), (0,))), (x, w)),
                                ("g @ Wᵀ", lambda a, b, dot=dot: dot(a, b, ((1,), (1,))), (g, w)),
                                ("xᵀ @ g", lambda a, b, dot=dot: dot(a, b, ((0,), (0,))), (x, g))):
            f = jax.jit(fn)
            parts[f"matmul {label} {name}"] = (lambda f=f, args=args: f(*args).block_until_ready(), mm)
        f = jax.jit(lambda a, b, dtype=dtype: jnp.dot(row_major_transpose(a.astype(dtype)),
                                                      b.astype(dtype), preferred_element_type=jnp.float32))
        parts[f"matmul xᵀ @ g {name}, xᵀ row-major"] = (lambda f=f: f(x, g).block_until_ready(), mm)
    if MKL:
        for label, (ta, tb), args in (("x @ W", (False, False), (x, w)), ("g @ Wᵀ", (False, True), (g, w)),
                                      ("xᵀ @ g", (True, False), (x, g))):
            f = jax.jit(functools.partial(mkl_matmul.mkl_dot, trans_a=ta, trans_b=tb))
            args = tuple(a.astype(BF16) for a in args)
            parts[f"matmul {label} bf16{MKL}"] = (lambda f=f, args=args: f(*args).block_until_ready(), mm)
    dims = [D_IN, H, H, H, 1]
    ws = [jnp.asarray(rng.normal(size=(a, b)) * 0.05, jnp.float32) for a, b in zip(dims[:-1], dims[1:])]
    xin = jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)
    y = jnp.asarray(rng.random(B) < 0.3, jnp.float32)
    mlp_flops = 3 * 2.0 * B * sum(a * b for a, b in zip(dims[:-1], dims[1:]))  # fwd + 2 bwd
    for bn in (True, False):
        for name, matmul in (("fp32", jnp.matmul), ("bf16", bf16_matmul_folded),
                             ("bf16, xᵀ row-major", bf16_matmul),
                             *([(f"bf16{MKL}", mkl_bf16_matmul)] if MKL else [])):
            f = jax.jit(jax.grad(functools.partial(jax_mlp_loss, matmul=matmul, batch_norm=bn)))
            key = f"MLP fwd+bwd {'BN' if bn else 'no BN'} {name}"
            parts[key] = (lambda f=f: jax.block_until_ready(f(ws, xin, y)), mlp_flops)
    table = jnp.asarray(rng.normal(size=(VOCAB, DIM)) * 1e-4, jnp.float32)
    ids = jnp.asarray(rng.zipf(1.2, size=(B, FIELDS)) % VOCAB, jnp.int32)
    v = jnp.asarray(rng.normal(size=(FIELDS * DIM, 1)), jnp.float32)
    gather = jax.jit(lambda t, i: jnp.take(t, i, axis=0).reshape(B, -1) @ v)
    grad = jax.jit(jax.grad(lambda t, i: jnp.sum(jnp.take(t, i, axis=0).reshape(B, -1) @ v)))
    parts["embedding gather fwd"] = (lambda: gather(table, ids).block_until_ready(), 0.0)
    parts["embedding gather fwd+dense grad"] = (lambda: grad(table, ids).block_until_ready(), 0.0)
    tx = optax.adam(1e-3)
    holder = [jnp.array(table, copy=True), tx.init(table)]  # donated: not the gather's table
    dense_g = grad(table, ids)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def adam(p, s, gr):
        u, s = tx.update(gr, s, p)
        return optax.apply_updates(p, u), s

    def adam_call():
        holder[0], holder[1] = adam(holder[0], holder[1], dense_g)
        jax.block_until_ready(holder[0])

    parts["Adam update of the 1M x 10 table"] = (adam_call, 0.0)
    return parts


def torch_parts() -> dict[str, tuple[Callable[[], object], float]]:
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(B, H, generator=gen), torch.randn(B, H, generator=gen)
    w = torch.randn(H, H, generator=gen) * 0.05
    mm = 2.0 * B * H * H
    parts = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        xa, ga, wa = x.to(dtype), g.to(dtype), w.to(dtype)
        parts[f"matmul x @ W {name}"] = (lambda xa=xa, wa=wa: xa @ wa, mm)
        parts[f"matmul g @ Wᵀ {name}"] = (lambda ga=ga, wa=wa: ga @ wa.T, mm)
        parts[f"matmul xᵀ @ g {name}"] = (lambda xa=xa, ga=ga: xa.T @ ga, mm)
    dims = [D_IN, H, H, H, 1]
    xin = torch.randn(B, D_IN, generator=gen)
    y = (torch.rand(B, generator=gen) < 0.3).float()
    mlp_flops = 3 * 2.0 * B * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    for bn in (True, False):
        layers = []
        for a, b in zip(dims[:-2], dims[1:-1]):
            layers += [torch.nn.Linear(a, b, bias=not bn), *([torch.nn.BatchNorm1d(b)] if bn else []),
                       torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers, torch.nn.Linear(H, 1))
        for name, autocast in (("fp32", False), ("bf16", True)):
            def step(net=net, autocast=autocast):
                net.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    z = net(xin)[:, 0].float()
                torch.nn.functional.binary_cross_entropy_with_logits(z, y).backward()
            parts[f"MLP fwd+bwd {'BN' if bn else 'no BN'} {name}"] = (step, mlp_flops)
    emb = torch.nn.Embedding(VOCAB, DIM)
    ids = torch.from_numpy(np.random.default_rng(0).zipf(1.2, size=(B, FIELDS)) % VOCAB)
    v = torch.randn(FIELDS * DIM, 1, generator=gen)
    parts["embedding gather fwd"] = (lambda: emb(ids).reshape(B, -1) @ v, 0.0)

    def emb_grad():
        emb.zero_grad(set_to_none=True)
        (emb(ids).reshape(B, -1) @ v).sum().backward()

    parts["embedding gather fwd+dense grad"] = (emb_grad, 0.0)
    emb_grad()
    opt = torch.optim.Adam(emb.parameters(), lr=1e-3)
    parts["Adam update of the 1M x 10 table"] = (opt.step, 0.0)
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed calls per part and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="write this markdown file")
    args = p.parse_args(argv)
    impls = {"jax": jax_parts(), "torch": torch_parts()}
    for parts in impls.values():  # compile and warm up
        for fn, _ in parts.values():
            fn(), fn()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name in impls["jax"]:
            for impl, parts in impls.items():
                if name in parts:
                    times.setdefault((name, impl), []).append(timed(parts[name][0], args.steps))
    lines = [
        "# Anatomy of the DNN train step (Criteo shape, batch 4096): JAX vs PyTorch, part by part",
        "", f"Command: `{' '.join(shlex.quote(a) for a in ['python', 'experiments/step_anatomy.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "", f"CPU: {cpu_model()}, {os.cpu_count()} cores. Versions: {versions()}"
        + (f", torch {__import__('torch').__version__}" if impls["torch"] else "")
        + f". XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`",
        "", f"Median ms of {args.steps} calls per round, median over {args.rounds} rounds; JAX and "
        "PyTorch interleaved. GFLOP/s for the matmuls and the MLP (forward + both backward matmuls).",
        "", "| part | JAX ms | PyTorch ms | JAX GFLOP/s | PyTorch GFLOP/s | PyTorch / JAX time |",
        "|---|---|---|---|---|---|"]
    for name, (_, flops) in impls["jax"].items():
        j = statistics.median(times[(name, "jax")])
        peer = name.removesuffix(MKL) if MKL else name  # MKL's rows beside PyTorch's bf16 ones
        t = statistics.median(times[(peer, "torch")]) if (peer, "torch") in times else float("nan")

        def rate(ms, flops=flops):
            return f"{flops / ms / 1e6:.0f}" if flops and ms == ms else ""

        lines.append(f"| {name} | {j:.2f} | {t:.2f} | {rate(j)} | {rate(t)} | {t / j:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
