"""kiln.nn: Module, Parameter, the layers, and the functional/init/utils namespaces, with
torch.nn's names and behaviour."""

from kiln.nn.parameter import Buffer, Parameter  # noqa: F401
from kiln.nn import functional, init  # noqa: F401
from kiln.nn.modules import *  # noqa: F401,F403
from kiln.nn.modules import Module  # noqa: F401
from kiln.nn.modules.module import (  # noqa: F401
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from kiln.nn import utils  # noqa: F401

# == Losses, normalization, attention ============================================================
# Their Module classes live in their own modules under kiln/nn/; add one import line per module
# here, e.g.:
#     from kiln.nn.loss import CrossEntropyLoss, MSELoss  # noqa: E402,F401
from kiln.nn.loss import (  # noqa: E402,F401
    BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, L1Loss, MSELoss, NLLLoss,
    SmoothL1Loss,
)
from kiln.nn.normalization import BatchNorm1d, BatchNorm2d, GroupNorm, LayerNorm  # noqa: E402,F401
from kiln.nn.attention import MultiheadAttention  # noqa: E402,F401
from kiln.nn.transformer import TransformerEncoder, TransformerEncoderLayer  # noqa: E402,F401
from kiln.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: E402,F401
# == end of losses, normalization, attention =====================================================
