"""Which ONNX operators Kiln claims, and the ONNX backend node tests that check them.

``CLAIMED`` is the one list: tests/onnx/test_backend_suite.py runs every node test of these ops
(all must pass), and scripts/onnx_coverage.py reports per-operator pass rates next to it.  Claim
an op only when all of its node tests pass.
"""

from __future__ import annotations

import functools
import re

# Operators whose every ONNX backend node test passes with Kiln (see docs/onnx-coverage.md).
CLAIMED: tuple = (
    "Abs", "Acos", "Acosh", "Add", "AffineGrid", "And", "ArgMax", "ArgMin", "Asin", "Asinh",
    "Atan", "Atanh", "Attention", "AveragePool", "BatchNormalization", "BitShift", "BitwiseAnd",
    "BitwiseNot",
    "BitwiseOr", "BitwiseXor", "BlackmanWindow", "CausalConvWithState", "Ceil", "Celu",
    "CenterCropPad", "Clip", "Col2Im", "Compress", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Cosh", "CumProd", "CumSum", "DeformConv", "DepthToSpace",
    "Div", "DynamicQuantizeLinear", "Einsum", "Elu", "Erf", "Exp", "Expand", "EyeLike",
    "Flatten", "Floor", "GRU", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax",
    "Identity", "If", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "LinearAttention", "Log",
    "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "MaxUnpool",
    "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg",
    "NegativeLogLikelihoodLoss", "NonMaxSuppression", "NonZero", "Not", "OneHot",
    "OptionalGetElement", "OptionalHasElement", "Or", "PRelu", "Pad", "Pow", "RMSNormalization",
    "RNN", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "RotaryEmbedding", "Round",
    "STFT", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "SequenceInsert",
    "SequenceMap", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice",
    "Softmax", "SoftmaxCrossEntropyLoss", "Softplus", "Softsign", "SpaceToDepth", "Split",
    "SplitToSequence", "Sqrt", "Squeeze", "Sub", "Sum", "SwiGLU", "Swish", "Tan", "Tanh",
    "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unique", "Unsqueeze", "Upsample",
    "Where", "Xor",
)

# Operators with no node tests of their own, claimed because the node tests of other ops (If,
# Loop, SequenceInsert, ...) and the shipped model tests (test_sequence_model*) that use them pass.
CLAIMED_WITHOUT_NODE_TESTS: tuple = (
    "ConcatFromSequence", "Optional", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceErase", "SequenceLength",
)

# Model tests (simple / pytorch-operator / pytorch-converted sets) made only of claimed ops that
# still fail, with the reason; the suite runs every other such model test.
KNOWN_MODEL_FAILURES: dict = {}


def _snake(op_type: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op_type).lower()


def _main_op(model, test_name: str) -> str:
    ops = [n.op_type for n in model.graph.node]
    if len(set(ops)) == 1:
        return ops[0]
    name = test_name[len("test_"):]
    hits = [op for op in ops if name.startswith(_snake(op)) or name.startswith(op.lower())]
    return max(hits, key=len) if hits else ops[-1]


@functools.lru_cache(maxsize=None)
def node_tests() -> list:
    """``(test name, operator, onnx.backend.test TestCase)`` for every node test of the onnx
    package; an ``_expanded`` test (the op's function body) counts for its op."""
    from kiln.onnx._deps import require

    require("onnx")
    from onnx.backend.test.loader import load_model_tests

    cases = load_model_tests(kind="node")
    ops = {}
    for case in cases:
        if "_expanded" not in case.name:
            ops[case.name] = _main_op(_model(case), case.name)
    out = []
    for case in cases:
        base = re.sub(r"_expanded.*$", "", case.name)
        op = ops.get(base) or _main_op(_model(case), case.name)
        out.append((case.name, op, case))
    return out


@functools.lru_cache(maxsize=None)
def model_tests(kinds=("simple", "pytorch-operator", "pytorch-converted")) -> list:
    """``(test name, set of op types, TestCase)`` for the model tests shipped in the wheel."""
    from onnx.backend.test.loader import load_model_tests

    out = []
    for kind in kinds:
        for case in load_model_tests(kind=kind):
            model = _model(case)
            out.append((case.name, {n.op_type for n in model.graph.node}, case))
    return out


# Node tests that onnx's own runner cannot check (its comparison of sequences calls len() on a
# 0-d tensor); tests/onnx/test_backend_suite.py runs them with ``run_case``, whose comparison
# recurses into sequences itself.
RUNNER_BUGS = {
    "test_loop16_seq_none": "a sequence output holding a 0-d tensor",
}


def suite_tests(claimed=CLAIMED) -> list:
    """Names of the backend tests CI runs: every node test of a claimed op, and every shipped
    model test whose ops are all claimed (except KNOWN_MODEL_FAILURES)."""
    claimed = set(claimed) | set(CLAIMED_WITHOUT_NODE_TESTS)
    names = [name for name, op, _ in node_tests() if op in claimed and name not in RUNNER_BUGS]
    names += [name for name, ops, _ in model_tests()
              if ops <= claimed and name not in KNOWN_MODEL_FAILURES]
    return names


def _model(case):
    import os

    import onnx

    if case.model_dir is None:
        return case.model
    return onnx.load(os.path.join(case.model_dir, "model.onnx"))


def run_case(case) -> None:
    """Run one backend test case with Kiln; AssertionError (or the error raised) on failure."""
    import glob
    import os

    from kiln.onnx.backend import KilnBackend

    model = _model(case)
    rep = KilnBackend.prepare(model)
    if case.model_dir is None:  # built in memory, with its data sets
        for inputs, refs in case.data_sets:
            inputs, refs = [_array(x) for x in inputs], [_array(x) for x in refs]
            compare(refs, rep.run(inputs), rtol=case.rtol, atol=case.atol)
        return
    for data_dir in sorted(glob.glob(os.path.join(case.model_dir, "test_data_set*"))):
        inputs, refs = [], []
        for kind, values, protos in (("input", inputs, model.graph.input),
                                     ("output", refs, model.graph.output)):
            paths = sorted(glob.glob(os.path.join(data_dir, f"{kind}_*.pb")), key=_index)
            values += [_load(path, vi.type) for path, vi in zip(paths, protos)]
        compare(refs, rep.run(inputs), rtol=case.rtol, atol=case.atol)


def compare(refs, outputs, rtol, atol) -> None:
    """onnx's output comparison, recursing into sequences (lists) and optionals (None) here."""
    from onnx.backend.test.runner import Runner

    assert len(outputs) == len(refs), f"{len(outputs)} outputs, expected {len(refs)}"
    for ref, out in zip(refs, outputs):
        if isinstance(ref, list):
            assert isinstance(out, list), f"expected a sequence, got {type(out).__name__}"
            compare(ref, out, rtol, atol)
        elif ref is None:
            assert out is None, "expected an empty optional"
        else:
            Runner.assert_similar_outputs([ref], [out], rtol=rtol, atol=atol)


def _load(path: str, type_proto):
    """A test data file as a NumPy array, a list (sequence) or None/value (optional)."""
    import onnx
    from onnx import numpy_helper

    kind = type_proto.WhichOneof("value")
    proto = {"sequence_type": onnx.SequenceProto,
             "optional_type": onnx.OptionalProto}.get(kind, onnx.TensorProto)()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    if kind == "sequence_type":
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        return numpy_helper.to_optional(proto)
    return numpy_helper.to_array(proto)


def _array(x):
    import onnx
    from onnx import numpy_helper

    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x


def _index(path: str) -> int:
    return int(re.search(r"_(\d+)\.pb$", path).group(1))


