"""TensorFlow: eager, ``tf.function`` and ``tf.function(jit_compile=True)`` (XLA).

Layout NHWC (TensorFlow's native CPU layout): the input and conv kernels are transposed once at
load time (OIHW -> HWIO) and the rows of ``fc1.w`` are permuted from (c, h, w) to (h, w, c)
flatten order -- a free relabelling, the math is the spec's.  Training step = one GradientTape
plus a Keras optimizer's ``apply_gradients``.  Keras' Adam adds eps to sqrt(v) ("epsilon hat")
where the spec (and PyTorch, optax) add it to sqrt(v_hat); ``SpecAdam`` below keeps Keras'
machinery and only moves eps (with stock Keras, gpt's loss@10 was off by 2e-5 relative).
Attention is explicit matmul + causal mask + softmax, as the spec says for TensorFlow.
"""

from __future__ import annotations

import math
import os

import numpy as np

import protocol
import workloads as W

MODES = ("eager", "function", "xla")
COMPILED = ("function", "xla")
MATMUL_MODES = ("eager", "xla")
tf = None


def modes():
    return list(MODES)


def setup(mode):
    global tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # log noise only
    import tensorflow as _tf

    tf = _tf
    n = protocol.THREADS
    tf.config.threading.set_intra_op_parallelism_threads(n)
    tf.config.threading.set_inter_op_parallelism_threads(n)
    return {"version": tf.__version__, "keras": tf.keras.__version__, "numpy": np.__version__,
            "threads": n,
            "threading": f"tf.config.threading.set_intra_op_parallelism_threads({n}), "
                         f"set_inter_op_parallelism_threads({n})"}


def _wrap(fn, mode):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "xla"))


def compile_init(mode):
    import time

    x = tf.ones(8)
    t = time.perf_counter()
    _wrap(lambda x: x * 2 + 1, mode)(x).numpy()
    return time.perf_counter() - t


# -- models ---------------------------------------------------------------------------------------

def _mlp(p, x):
    h = tf.nn.relu(tf.matmul(x, p["fc1.w"]) + p["fc1.b"])
    h = tf.nn.relu(tf.matmul(h, p["fc2.w"]) + p["fc2.b"])
    return tf.matmul(h, p["fc3.w"]) + p["fc3.b"]


def _cnn(p, x):
    h = tf.nn.relu(tf.nn.conv2d(x, p["conv1.w"], 1, "SAME") + p["conv1.b"])
    h = tf.nn.max_pool2d(h, 2, 2, "VALID")
    h = tf.nn.relu(tf.nn.conv2d(h, p["conv2.w"], 1, "SAME") + p["conv2.b"])
    h = tf.nn.max_pool2d(h, 2, 2, "VALID")
    h = tf.reshape(h, (-1, 1568))
    h = tf.nn.relu(tf.matmul(h, p["fc1.w"]) + p["fc1.b"])
    return tf.matmul(h, p["fc2.w"]) + p["fc2.b"]


def _ln(x, g, b):
    mean = tf.reduce_mean(x, -1, keepdims=True)
    var = tf.reduce_mean(tf.square(x - mean), -1, keepdims=True)  # biased
    return (x - mean) * tf.math.rsqrt(var + 1e-5) * g + b


def _gpt(p, idx):
    B, T = idx.shape
    C, H = W.GPT["C"], W.GPT["n_head"]
    D = C // H
    mask = tf.constant(np.tril(np.ones((T, T), bool)))
    x = tf.reshape(tf.gather(p["wte"], idx) + p["wpe"][:T], (B * T, C))
    for i in range(W.GPT["n_layer"]):
        a = _ln(x, p[f"h{i}.ln1.g"], p[f"h{i}.ln1.b"])
        qkv = tf.matmul(a, p[f"h{i}.attn.qkv.w"]) + p[f"h{i}.attn.qkv.b"]
        q, k, v = (tf.transpose(tf.reshape(t, (B, T, H, D)), (0, 2, 1, 3))
                   for t in tf.split(qkv, 3, axis=1))
        att = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(D))
        att = tf.nn.softmax(tf.where(mask, att, float("-inf")), axis=-1)
        y = tf.reshape(tf.transpose(tf.matmul(att, v), (0, 2, 1, 3)), (B * T, C))
        x = x + (tf.matmul(y, p[f"h{i}.attn.proj.w"]) + p[f"h{i}.attn.proj.b"])
        m = _ln(x, p[f"h{i}.ln2.g"], p[f"h{i}.ln2.b"])
        h = tf.nn.gelu(tf.matmul(m, p[f"h{i}.mlp.fc.w"]) + p[f"h{i}.mlp.fc.b"],
                       approximate=False)
        x = x + (tf.matmul(h, p[f"h{i}.mlp.proj.w"]) + p[f"h{i}.mlp.proj.b"])
    x = _ln(x, p["ln_f.g"], p["ln_f.b"])
    return tf.matmul(x, p["lm_head.w"])  # (B*T, vocab)


FORWARD = {"mlp": _mlp, "cnn": _cnn, "gpt": _gpt}


def _input(workload, x):
    return x.transpose(0, 2, 3, 1).copy() if workload == "cnn" else x


def _spec_adam(base):
    """A Keras Adam/AdamW whose step is the spec's: p -= lr * m_hat / (sqrt(v_hat) + eps).
    (AdamW's decoupled decay, p -= lr * wd * p before the step, is Keras' own.)"""
    ops = tf.keras.ops

    class SpecAdam(base):
        def update_step(self, gradient, variable, learning_rate):
            dt = variable.dtype
            lr, g = ops.cast(learning_rate, dt), ops.cast(gradient, dt)
            t = ops.cast(self.iterations + 1, dt)
            m = self._momentums[self._get_variable_index(variable)]
            v = self._velocities[self._get_variable_index(variable)]
            self.assign_add(m, ops.multiply(ops.subtract(g, m), 1 - self.beta_1))
            self.assign_add(v, ops.multiply(ops.subtract(ops.square(g), v), 1 - self.beta_2))
            m_hat = ops.divide(m, 1 - ops.power(ops.cast(self.beta_1, dt), t))
            v_hat = ops.divide(v, 1 - ops.power(ops.cast(self.beta_2, dt), t))
            self.assign_sub(variable, ops.divide(ops.multiply(m_hat, lr),
                                                 ops.add(ops.sqrt(v_hat), self.epsilon)))

    return SpecAdam


def _optimizer(workload):
    opt = tf.keras.optimizers
    if workload == "mlp":
        return _spec_adam(opt.Adam)(1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    if workload == "cnn":
        return opt.SGD(0.01, momentum=0.9)
    return _spec_adam(opt.AdamW)(3e-4, weight_decay=0.01, beta_1=0.9, beta_2=0.999,
                                 epsilon=1e-8)


# -- the protocol interface -----------------------------------------------------------------------

def build_train(mode, workload):
    p = {k: tf.Variable(v, name=k.replace(".", "_"))
         for k, v in W.to_nhwc(W.params(workload)).items()}
    variables = list(p.values())
    x, y = W.train_data(workload)
    x = tf.constant(_input(workload, x))
    y = tf.constant(y.reshape(-1).astype(np.int32))
    fwd = FORWARD[workload]
    opt = _optimizer(workload)
    opt.build(variables)  # slot variables created eagerly, outside any traced function

    def step():
        with tf.GradientTape() as tape:
            logits = fwd(p, x)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        # dense gradients (the wte gather gives IndexedSlices), as PyTorch's embedding grad
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        opt.apply_gradients(zip(grads, variables))
        return loss

    return _wrap(step, mode), _sync, lambda loss: float(loss.numpy())


def build_infer(mode, workload, batch):
    p = {k: tf.constant(v) for k, v in W.to_nhwc(W.params(workload)).items()}
    x = tf.constant(_input(workload, W.infer_data(workload, batch)))
    fwd = _wrap(lambda x: FORWARD[workload](p, x), mode)
    return (lambda: fwd(x)), _sync, None


def build_matmul(mode, n):
    a, b = (tf.constant(m) for m in protocol.matmul_operands(n))
    mm = _wrap(lambda a, b: tf.matmul(a, b), mode)
    return (lambda: mm(a, b)), _sync


def _sync(out):
    return out.numpy()
