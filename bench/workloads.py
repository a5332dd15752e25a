"""The benchmark workloads of shared/bench-workloads.md (spec version 1), written once against
the PyTorch API so the same code runs on ``lib=torch`` and ``lib=kiln``.

Parameters and data come from numpy's PCG64 in the order the spec lists, so every framework
starts from identical values; ``loss_step1`` and ``loss_step10`` must agree across frameworks.
"""

from __future__ import annotations

import math

import numpy as np

SPEC_VERSION = 1
FLOPS = {"mlp": 77.53e6, "cnn": 1121.2e6, "gpt": 5285.6e6,
         "mlp_infer_b1": 0.538e6, "mlp_infer_b256": 137.6e6, "cnn_infer_b1": 6.05e6}


def _u(rng, k, shape):
    return rng.uniform(-k, k, shape).astype(np.float32)


def _n(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


# -- parameters and data (framework-free numpy) -------------------------------------------------

def mlp_params() -> dict:
    rng = np.random.default_rng(0)
    p = {}
    for i, (fi, fo) in enumerate([(784, 256), (256, 256), (256, 10)], 1):
        k = 1 / math.sqrt(fi)
        p[f"fc{i}.w"] = _u(rng, k, (fi, fo))
        p[f"fc{i}.b"] = _u(rng, k, (fo,))
    return p


def mlp_data(batch: int = 64):
    rng = np.random.default_rng(1000 + 0 + batch)
    x = rng.standard_normal((batch, 784), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    return x, y


def cnn_params() -> dict:
    rng = np.random.default_rng(1)
    p = {}
    p["conv1.w"] = _u(rng, 1 / math.sqrt(25), (16, 1, 5, 5))
    p["conv1.b"] = _u(rng, 1 / math.sqrt(25), (16,))
    p["conv2.w"] = _u(rng, 1 / math.sqrt(400), (32, 16, 5, 5))
    p["conv2.b"] = _u(rng, 1 / math.sqrt(400), (32,))
    p["fc1.w"] = _u(rng, 1 / math.sqrt(1568), (1568, 128))
    p["fc1.b"] = _u(rng, 1 / math.sqrt(1568), (128,))
    p["fc2.w"] = _u(rng, 1 / math.sqrt(128), (128, 10))
    p["fc2.b"] = _u(rng, 1 / math.sqrt(128), (10,))
    return p


def cnn_data(batch: int = 64, seed: int | None = None):
    rng = np.random.default_rng(1000 + 1 + batch if seed is None else seed)
    x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    return x, y


GPT = dict(vocab=65, T=64, n_layer=4, n_head=4, C=128, B=16)


def gpt_params() -> dict:
    rng = np.random.default_rng(2)
    C, V, T = GPT["C"], GPT["vocab"], GPT["T"]
    p = {"wte": _n(rng, (V, C)), "wpe": _n(rng, (T, C))}
    for i in range(GPT["n_layer"]):
        p[f"h{i}.ln1.g"] = np.ones(C, np.float32)
        p[f"h{i}.ln1.b"] = np.zeros(C, np.float32)
        p[f"h{i}.attn.qkv.w"] = _n(rng, (C, 3 * C))
        p[f"h{i}.attn.qkv.b"] = np.zeros(3 * C, np.float32)
        p[f"h{i}.attn.proj.w"] = _n(rng, (C, C))
        p[f"h{i}.attn.proj.b"] = np.zeros(C, np.float32)
        p[f"h{i}.ln2.g"] = np.ones(C, np.float32)
        p[f"h{i}.ln2.b"] = np.zeros(C, np.float32)
        p[f"h{i}.mlp.fc.w"] = _n(rng, (C, 4 * C))
        p[f"h{i}.mlp.fc.b"] = np.zeros(4 * C, np.float32)
        p[f"h{i}.mlp.proj.w"] = _n(rng, (4 * C, C))
        p[f"h{i}.mlp.proj.b"] = np.zeros(C, np.float32)
    p["ln_f.g"] = np.ones(C, np.float32)
    p["ln_f.b"] = np.zeros(C, np.float32)
    p["lm_head.w"] = _n(rng, (C, V))
    return p


def gpt_data():
    rng = np.random.default_rng(1000 + 2)
    tok = rng.integers(0, GPT["vocab"], size=(GPT["B"], GPT["T"] + 1))
    return tok[:, :-1], tok[:, 1:]


# -- models, written against the PyTorch API ----------------------------------------------------

def mlp_forward(lib, p, x):
    F = lib.nn.functional
    h = F.relu(x @ p["fc1.w"] + p["fc1.b"])
    h = F.relu(h @ p["fc2.w"] + p["fc2.b"])
    return h @ p["fc3.w"] + p["fc3.b"]


def cnn_forward(lib, p, x):
    F = lib.nn.functional
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.w"], p["conv1.b"], padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.w"], p["conv2.b"], padding=2)), 2)
    h = h.reshape(h.shape[0], -1)
    h = F.relu(h @ p["fc1.w"] + p["fc1.b"])
    return h @ p["fc2.w"] + p["fc2.b"]


def gpt_forward(lib, p, idx):
    F = lib.nn.functional
    B, T = idx.shape
    C, H = GPT["C"], GPT["n_head"]
    x = p["wte"][idx] + p["wpe"][:T]
    for i in range(GPT["n_layer"]):
        a = F.layer_norm(x, (C,), p[f"h{i}.ln1.g"], p[f"h{i}.ln1.b"], 1e-5)
        qkv = a @ p[f"h{i}.attn.qkv.w"] + p[f"h{i}.attn.qkv.b"]
        q, k, v = qkv.split(C, dim=2)
        q = q.reshape(B, T, H, C // H).transpose(1, 2)
        k = k.reshape(B, T, H, C // H).transpose(1, 2)
        v = v.reshape(B, T, H, C // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + (y @ p[f"h{i}.attn.proj.w"] + p[f"h{i}.attn.proj.b"])
        m = F.layer_norm(x, (C,), p[f"h{i}.ln2.g"], p[f"h{i}.ln2.b"], 1e-5)
        h = F.gelu(m @ p[f"h{i}.mlp.fc.w"] + p[f"h{i}.mlp.fc.b"])
        x = x + (h @ p[f"h{i}.mlp.proj.w"] + p[f"h{i}.mlp.proj.b"])
    x = F.layer_norm(x, (C,), p["ln_f.g"], p["ln_f.b"], 1e-5)
    return x @ p["lm_head.w"]


# -- the same, uniformly -------------------------------------------------------------------------

INFERENCE = {"mlp": (1, 256), "cnn": (1,)}  # batch sizes of the inference cases


def params(workload: str) -> dict:
    """Initial parameters (numpy float32, spec layout: Linear W is (in, out), conv OIHW)."""
    return {"mlp": mlp_params, "cnn": cnn_params, "gpt": gpt_params}[workload]()


def train_data(workload: str):
    """The fixed training batch ``(inputs, targets)``; integer arrays are int64."""
    return {"mlp": mlp_data, "cnn": cnn_data, "gpt": gpt_data}[workload]()


def infer_data(workload: str, batch: int):
    """The inference input: seed 1000 + (0 for mlp, 1 for cnn) + batch, ``x`` only."""
    if workload == "mlp":
        return mlp_data(batch)[0]
    if workload == "cnn":
        return cnn_data(batch)[0]
    raise ValueError(f"no inference case for {workload!r}")


def to_nhwc(p: dict) -> dict:
    """Spec parameters relabelled for NHWC frameworks (TensorFlow, JAX/XLA): conv kernels OIHW
    -> HWIO, and the rows of ``fc1.w`` permuted from (c, h, w) to (h, w, c) flatten order, so
    the math is unchanged.  Parameters of the other workloads pass through."""
    p = dict(p)
    if "conv1.w" in p:
        p["conv1.w"] = p["conv1.w"].transpose(2, 3, 1, 0)
        p["conv2.w"] = p["conv2.w"].transpose(2, 3, 1, 0)
        p["fc1.w"] = p["fc1.w"].reshape(32, 7, 7, -1).transpose(1, 2, 0, 3).reshape(1568, -1)
    return {k: np.ascontiguousarray(v) for k, v in p.items()}


FORWARD = {"mlp": mlp_forward, "cnn": cnn_forward, "gpt": gpt_forward}


# -- training steps (PyTorch API: lib=torch or lib=kiln) ----------------------------------------

def build(lib, workload: str, compile=None, whole_step: bool = False):
    """Return ``(step, params)``: ``step()`` runs one training step and returns the loss tensor
    (not copied to the host).

    With ``compile`` (e.g. ``torch.compile``), the forward+loss is compiled (the framework
    derives the backward) and ``optimizer.step()`` is compiled separately; ``loss.backward()``
    runs between them -- the pattern PyTorch's documentation recommends.  With
    ``whole_step=True`` (kiln.compile) the whole step, backward and update included, is one
    compiled function."""
    F = lib.nn.functional
    fwd = FORWARD[workload]
    x, y = train_data(workload)
    p = {k: lib.tensor(v, requires_grad=True) for k, v in params(workload).items()}
    xt, yt = lib.tensor(x), lib.tensor(y, dtype=lib.int64)
    plist = list(p.values())
    if workload == "mlp":
        opt = lib.optim.Adam(plist, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    elif workload == "cnn":
        opt = lib.optim.SGD(plist, lr=0.01, momentum=0.9)
    else:
        opt = lib.optim.AdamW(plist, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def loss_fn(xt, yt):
        logits = fwd(lib, p, xt)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yt.reshape(-1))

    def opt_step():
        opt.step()

    if compile is not None and not whole_step:
        loss_fn, opt_step = compile(loss_fn), compile(opt_step)

    def step():
        opt.zero_grad()
        loss = loss_fn(xt, yt)
        loss.backward()
        opt_step()
        return loss

    if compile is not None and whole_step:
        return compile(step), p
    return step, p


def build_inference(lib, workload: str, batch: int, compile=None):
    """Return ``call()`` running the forward pass on a pre-built input (``mlp`` or ``cnn``);
    with ``compile``, one compiled forward for this batch size."""
    fwd = FORWARD[workload]
    p = {k: lib.tensor(v) for k, v in params(workload).items()}
    xt = lib.tensor(infer_data(workload, batch))

    def forward(xt):
        return fwd(lib, p, xt)

    if compile is not None:
        forward = compile(forward)

    def call():
        return forward(xt)

    return call
