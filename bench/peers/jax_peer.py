"""JAX + optax: eager (no ``jit``: every primitive is dispatched on its own, op by op) and
``jax.jit`` of the whole step (value_and_grad + optax update, params and optimizer state
donated).

Layout NHWC (XLA:CPU's native one): the input and conv kernels are transposed once at load time
(OIHW -> HWIO) and the rows of ``fc1.w`` permuted to (h, w, c) flatten order, as for TensorFlow.
Attention is ``jax.nn.dot_product_attention(is_causal=True)`` (the spec allows the fused form).
Threads: XLA:CPU's pool defaults to the visible cores (2); JAX has no API to set it.
"""

from __future__ import annotations

import os

import numpy as np

import protocol
import workloads as W

MODES = ("eager", "jit")
COMPILED = ("jit",)
MATMUL_MODES = ("jit",)
jax = jnp = optax = None


def modes():
    return list(MODES)


def setup(mode):
    global jax, jnp, optax
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no accelerator probing
    import jax as _jax
    import jax.numpy as _jnp
    import jaxlib
    import optax as _optax

    jax, jnp, optax = _jax, _jnp, _optax
    return {"version": jax.__version__, "jaxlib": jaxlib.__version__,
            "optax": optax.__version__, "numpy": np.__version__,
            "threads": os.cpu_count(),
            "threading": "XLA:CPU default pool = visible cores "
                         f"({os.cpu_count()}); devices {jax.devices()}"}


def _wrap(fn, mode, **kw):
    return jax.jit(fn, **kw) if mode == "jit" else fn


def compile_init(mode):
    import time

    x = jnp.ones(8)
    t = time.perf_counter()
    _wrap(lambda x: x * 2 + 1, mode)(x).block_until_ready()
    return time.perf_counter() - t


# -- models ---------------------------------------------------------------------------------------

def _mlp(p, x):
    h = jax.nn.relu(x @ p["fc1.w"] + p["fc1.b"])
    h = jax.nn.relu(h @ p["fc2.w"] + p["fc2.b"])
    return h @ p["fc3.w"] + p["fc3.b"]


def _conv(x, w, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


def _pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _cnn(p, x):
    h = _pool(jax.nn.relu(_conv(x, p["conv1.w"], p["conv1.b"])))
    h = _pool(jax.nn.relu(_conv(h, p["conv2.w"], p["conv2.b"])))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ p["fc1.w"] + p["fc1.b"])
    return h @ p["fc2.w"] + p["fc2.b"]


def _ln(x, g, b):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)  # biased
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * g + b


def _gpt(p, idx):
    B, T = idx.shape
    C, H = W.GPT["C"], W.GPT["n_head"]
    x = p["wte"][idx] + p["wpe"][:T]
    for i in range(W.GPT["n_layer"]):
        a = _ln(x, p[f"h{i}.ln1.g"], p[f"h{i}.ln1.b"])
        qkv = a @ p[f"h{i}.attn.qkv.w"] + p[f"h{i}.attn.qkv.b"]
        q, k, v = (t.reshape(B, T, H, C // H) for t in jnp.split(qkv, 3, axis=-1))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, T, C)
        x = x + (y @ p[f"h{i}.attn.proj.w"] + p[f"h{i}.attn.proj.b"])
        m = _ln(x, p[f"h{i}.ln2.g"], p[f"h{i}.ln2.b"])
        h = jax.nn.gelu(m @ p[f"h{i}.mlp.fc.w"] + p[f"h{i}.mlp.fc.b"], approximate=False)
        x = x + (h @ p[f"h{i}.mlp.proj.w"] + p[f"h{i}.mlp.proj.b"])
    x = _ln(x, p["ln_f.g"], p["ln_f.b"])
    return x @ p["lm_head.w"]


FORWARD = {"mlp": _mlp, "cnn": _cnn, "gpt": _gpt}


def _input(workload, x):
    return x.transpose(0, 2, 3, 1).copy() if workload == "cnn" else x


def _optimizer(workload):
    if workload == "mlp":
        return optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
    if workload == "cnn":
        return optax.sgd(0.01, momentum=0.9)
    return optax.adamw(3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


# -- the protocol interface -----------------------------------------------------------------------

def build_train(mode, workload):
    params = {k: jnp.asarray(v) for k, v in W.to_nhwc(W.params(workload)).items()}
    x, y = W.train_data(workload)
    x, y = jnp.asarray(_input(workload, x)), jnp.asarray(y.astype(np.int32))
    fwd = FORWARD[workload]
    opt = _optimizer(workload)

    def loss_fn(params):
        logits = fwd(params, x)
        logits = logits.reshape(-1, logits.shape[-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).mean()

    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = _wrap(train_step, mode, donate_argnums=(0, 1))
    state = [params, opt.init(params)]

    def step():
        state[0], state[1], loss = train_step(state[0], state[1])
        return loss

    def sync(loss):
        jax.block_until_ready((loss, state))  # eager: the updates run after the loss

    return step, sync, lambda loss: float(loss)


def build_infer(mode, workload, batch):
    params = {k: jnp.asarray(v) for k, v in W.to_nhwc(W.params(workload)).items()}
    x = jnp.asarray(_input(workload, W.infer_data(workload, batch)))
    fwd = _wrap(FORWARD[workload], mode)
    return (lambda: fwd(params, x)), _sync, None


def build_matmul(mode, n):
    a, b = (jnp.asarray(m) for m in protocol.matmul_operands(n))
    mm = _wrap(lambda a, b: a @ b, mode)
    return (lambda: mm(a, b)), _sync


def _sync(out):
    return out.block_until_ready()

