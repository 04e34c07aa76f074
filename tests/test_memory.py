"""The memory a run needs (mistral/memory.py)."""
import torch
from helpers import SIX_EXPERTS as MOE, tiny_params

from mistral.memory import Memory
from mistral.model import ModelArgs, Transformer


def test_grouping_is_counted_in_the_memory_a_run_needs():
    """Stacking holds one kind of a layer's expert weights twice for a moment (E * hidden * dim), and grouped
    pre-fill runs K FFN rows a token: with a stack larger than the work space, the need grows by the difference."""
    params = tiny_params(dim=512, hidden_dim=8192, **MOE)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_dict(params))
    plain = Memory.of(model, torch.bfloat16, 0, 4)
    grouped_ = Memory.of(model, torch.bfloat16, 0, 4, grouped=True)
    assert grouped_.weights == plain.weights and grouped_.work == 6 * 8192 * 512 * 2 > plain.work
