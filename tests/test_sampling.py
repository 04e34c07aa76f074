"""Sampling (mistral/sampling.py): top-p, top-k, seeds, and every accepted value at its limit."""
import pytest
import torch
from helpers import PROMPTS, random_model, tiny_params

from mistral.generate import generate_ids
from mistral.sampling import sample, sample_top_p


def test_seeded_sampling_repeats_and_greedy_limits():
    model = random_model(tiny_params())

    def run(seed, **kw):
        return generate_ids(PROMPTS, model, max_tokens=10, generator=torch.Generator().manual_seed(seed), **kw)[0]

    assert run(0, temperature=1.0) == run(0, temperature=1.0)
    assert run(0, temperature=1.0) != run(1, temperature=1.0)
    greedy = generate_ids(PROMPTS, model, max_tokens=10)[0]
    assert run(0, temperature=1.0, top_k=1) == greedy
    assert run(0, temperature=1.0, top_p=1e-6) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {sample_top_p(probs, 0.8, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8
    seen = {sample_top_p(probs, 0.81, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1, 2}


def test_top_k_masks_all_but_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    seen = {sample(logits, 5.0, top_p=1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item()
            for s in range(200)}
    assert seen == {1, 3}


@pytest.mark.parametrize("temperature, top_p, top_k", [(1e-40, 0.8, 0), (1e-45, 1.0, 0), (1e-320, 0.9, 0),
                                                       (1.0, 1e-300, 0), (5.0, 1e-45, 0), (1e-38, 1e-45, 3),
                                                       (0.7, 1e-30, 1)])
def test_every_accepted_sampling_value_works_as_its_limit(temperature, top_p, top_k):
    """Where the arithmetic underflows (a temperature or top_p that rounds to 0), the sampler is its limit: greedy."""
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)) * 4
    got = sample(logits, temperature, top_p, top_k, torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1))


def test_sampling_at_tiny_temperatures_through_generate():
    model = random_model(tiny_params())
    greedy = generate_ids([[1, 2, 3]], model, max_tokens=6)[0]
    for temperature in (1e-40, 1e-320):
        assert generate_ids([[1, 2, 3]], model, max_tokens=6, temperature=temperature,
                            generator=torch.Generator().manual_seed(0))[0] == greedy
