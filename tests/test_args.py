"""ModelArgs (mistral/args.py): params.json values are checked and typed when read (issue #13)."""
import math

import pytest
from helpers import tiny_params

from mistral.args import ModelArgs
from mistral.errors import MistralError


BASE = tiny_params()


CONFIGS = {
    "norm_eps a string": ({"norm_eps": "abc"}, r"'norm_eps' must be a finite number above 0, got 'abc'"),
    "rope_theta a string": ({"rope_theta": "x"}, r"'rope_theta' must be a finite number above 0"),
    "norm_eps NaN": ({"norm_eps": math.nan}, r"'norm_eps' must be a finite number above 0, got nan"),
    "norm_eps -1": ({"norm_eps": -1}, r"'norm_eps' must be a finite number above 0"),
    "norm_eps infinite": ({"norm_eps": math.inf}, r"'norm_eps' must be a finite number above 0"),
    "rope_theta 0": ({"rope_theta": 0}, r"'rope_theta' must be a finite number above 0, got 0"),
    "rope_theta negative": ({"rope_theta": -1e4}, r"'rope_theta' must be a finite number above 0"),
    "moe of strings": ({"moe": {"num_experts": "8", "num_experts_per_tok": "2"}}, r"'moe.num_experts' must be a whole"),
    "moe a list": ({"moe": [8, 2]}, r"'moe' must be an object"),
    "moe of lists": ({"moe": {"num_experts": [8], "num_experts_per_tok": 2}}, r"'moe.num_experts' must be a whole"),
    "moe with an unknown key": ({"moe": {"num_experts": 4, "num_experts_per_tok": 2, "shared": 1}}, r"shared"),
    "sliding_window 1e15": ({"sliding_window": 1e15}, r"'sliding_window' must be a whole number from 1 to"),
    "sliding_window fractional": ({"sliding_window": 2.5}, r"'sliding_window' must be a whole number"),
    "sliding_window a pattern that does not divide the layers": ({"sliding_window": [4, 4, None]},
                                                                  r"its length must divide n_layers \(2\), got 3"),
    "sliding_window an empty pattern": ({"sliding_window": []}, r"its length must divide n_layers"),
    "sliding_window a pattern with a 0": ({"sliding_window": [4, 0]}, r"'sliding_window' must be a whole number"),
    "dim a string": ({"dim": "32"}, r"'dim' must be a whole number"),
    "n_layers huge": ({"n_layers": 10**12}, r"'n_layers' must be a whole number from 1 to"),
    "head_dim odd": ({"head_dim": 7, "n_heads": 4, "n_kv_heads": 2}, r"'head_dim' must be even"),
    "vocab_size boolean": ({"vocab_size": True}, r"'vocab_size' must be a whole number"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_config_values_are_checked_when_read(case):
    change, message = CONFIGS[case]
    with pytest.raises(MistralError, match=message) as e:
        ModelArgs.from_dict({**BASE, **change})
    assert "\n" not in str(e.value) and str(e.value).startswith("params.json")


def test_config_values_get_their_types():
    args = ModelArgs.from_dict({**BASE, "dim": 32.0, "norm_eps": 1, "rope_theta": 10000, "sliding_window": 5.0})
    assert (type(args.dim), type(args.norm_eps), type(args.rope_theta), type(args.sliding_window)) == (int, float,
                                                                                                      float, int)


def test_a_pattern_of_windows_repeats_over_the_layers():
    """mistral-inference's reading: the list is a pattern; the cache holds the widest window, or every position
    where a layer has none."""
    args = ModelArgs.from_dict({**BASE, "n_layers": 4, "sliding_window": [3, 7.0]})
    assert args.windows == [3, 7, 3, 7] and args.window == 7
    full = ModelArgs.from_dict({**BASE, "n_layers": 4, "sliding_window": [3, None]})
    assert full.windows == [3, None, 3, None] and full.window is None
    assert ModelArgs.from_dict({**BASE, "sliding_window": 5}).windows == [5, 5]
