"""one_file_ref.py, the executable spec, against the package: the same weights give the same logits, for a dense model
and a mixture, with a window per layer, for packed prompts longer than the window, pre-filled in chunks around W and
then decoded."""
import pytest
import torch
from helpers import MOE, random_model, tiny_params

import one_file_ref as ref
from mistral.cache import RotatingBufferCache


def reference(model) -> ref.Transformer:
    """The spec's model, built from the package model's args and loaded with its state dict as it is."""
    a = model.args
    args = ref.ModelArgs(dim=a.dim, n_layers=a.n_layers, head_dim=a.head_dim, hidden_dim=a.hidden_dim,
                         n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, norm_eps=a.norm_eps, vocab_size=a.vocab_size,
                         sliding_window=a.sliding_window, rope_theta=a.rope_theta,
                         moe=None if a.moe is None else {"num_experts": a.moe.num_experts,
                                                         "num_experts_per_tok": a.moe.num_experts_per_tok})
    spec = ref.Transformer(args)
    spec.load_state_dict(model.state_dict(), strict=True)
    return spec.eval()


@pytest.mark.parametrize("params", [tiny_params(), tiny_params(moe=MOE), tiny_params(sliding_window=None),
                                    tiny_params(sliding_window=[3, 5]), tiny_params(sliding_window=[None, 3])],
                         ids=["dense", "moe", "no-window", "layer-windows", "window-and-full"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 6, 100])  # around the window of 5, and whole prompts
def test_the_spec_and_the_package_give_the_same_logits(params, chunk):
    model = random_model(params)
    spec = reference(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (13, 3, 8)]
    W, args = model.args.window, model.args
    cache = RotatingBufferCache(args.n_layers, len(prompts), W or 40, args.n_kv_heads, args.head_dim,
                                windows=model.layer_windows)
    # The package: every prompt packed in one step per chunk, then three decode steps of every row.
    ours: list[list[torch.Tensor]] = [[] for _ in prompts]
    fed = [0] * len(prompts)
    with torch.no_grad():
        while any(f < len(p) for f, p in zip(fed, prompts)):
            parts = [p[f : f + chunk] for f, p in zip(fed, prompts)]
            logits = model(torch.tensor(sum(parts, [])), [len(x) for x in parts], cache)
            for b, rows in enumerate(logits.split([len(x) for x in parts])):
                ours[b].append(rows)
                fed[b] += len(parts[b])
        decoded = [[7 + b, 9 + b, 11 + b] for b in range(len(prompts))]
        for step in range(3):
            logits = model(torch.tensor([d[step] for d in decoded]), [1] * len(prompts), cache)
            for b in range(len(prompts)):
                ours[b].append(logits[b : b + 1])
    # The spec: one sequence at a time, all of it in one forward, on its own plain rolling caches.
    for b, prompt in enumerate(prompts):
        tokens = prompt + decoded[b]
        # Each layer's own window of slots (the package's cache holds the widest for every layer).
        caches = [ref.RollingCache(spec.args.window(i) or 40, args.n_kv_heads, args.head_dim, torch.float32)
                  for i in range(args.n_layers)]
        with torch.no_grad():
            theirs = spec(tokens, 0, caches)  # (T, V)
        torch.testing.assert_close(torch.cat(ours[b]), theirs, rtol=1e-4, atol=1e-4)
