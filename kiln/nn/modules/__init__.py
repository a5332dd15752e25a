"""The Module classes of kiln.nn, one file per family (as torch.nn.modules)."""

from kiln.nn.modules.module import Module  # noqa: F401
from kiln.nn.modules.container import *  # noqa: F401,F403
from kiln.nn.modules.linear import *  # noqa: F401,F403
from kiln.nn.modules.conv import *  # noqa: F401,F403
from kiln.nn.modules.pooling import *  # noqa: F401,F403
from kiln.nn.modules.dropout import *  # noqa: F401,F403
from kiln.nn.modules.sparse import *  # noqa: F401,F403
from kiln.nn.modules.activation import *  # noqa: F401,F403
from kiln.nn.modules.flatten import *  # noqa: F401,F403
