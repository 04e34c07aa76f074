"""Logits equivalence through chunking and the sliding window, on CPU: `python -m test_generate`.

A tiny random model with a window of 4 scores prompts longer than 3 windows three ways: one packed
pass without a cache, pre-fill into the rolling cache in chunks of every size around the window, and
token-by-token decode past the window. All three must agree, logit for logit.
"""
import torch

from mistral.cache import RotatingBufferCache
from mistral.model import ModelArgs, Transformer

W = 4
ARGS = ModelArgs(dim=32, n_layers=3, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=100, sliding_window=W, rope_theta=1e4)
PROMPT_LENS = [3 * W + 1, 2, 5 * W]


def _model_and_prompts():
    torch.manual_seed(0)
    model = Transformer(ARGS, max_batch_size=len(PROMPT_LENS)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    prompts = [torch.randint(0, ARGS.vocab_size, (n,)).tolist() for n in PROMPT_LENS]
    return model, prompts


@torch.no_grad()
def _chunked_logits(model, prompts, chunk_size):
    """Feed every prompt through the cache chunk_size tokens at a time; logits in packed order."""
    cache = RotatingBufferCache(model.n_local_layers, len(prompts), W, ARGS.n_kv_heads, ARGS.head_dim)
    pieces = [[] for _ in prompts]
    for start in range(0, max(map(len, prompts)), chunk_size):
        chunks = [p[start : start + chunk_size] for p in prompts]
        lens = [len(c) for c in chunks]
        logits = model(torch.tensor(sum(chunks, [])), lens, cache)
        for b, part in enumerate(logits.split(lens)):
            pieces[b].append(part)
    return torch.cat([torch.cat(p) for p in pieces])


def test_chunked_prefill_equals_one_pass():
    model, prompts = _model_and_prompts()
    with torch.no_grad():
        full = model(torch.tensor(sum(prompts, [])), [len(p) for p in prompts])
    for chunk_size in (1, W - 1, W, W + 1, 2 * W + 3, 100):
        torch.testing.assert_close(_chunked_logits(model, prompts, chunk_size), full,
                                   msg=lambda m: f"chunk_size={chunk_size}: {m}")


def test_decode_past_the_window_equals_one_pass():
    model, prompts = _model_and_prompts()
    with torch.no_grad():
        full = model(torch.tensor(sum(prompts, [])), [len(p) for p in prompts])
        want = full.split([len(p) for p in prompts])
        cache = RotatingBufferCache(model.n_local_layers, len(prompts), W, ARGS.n_kv_heads, ARGS.head_dim)
        model(torch.tensor([p[0] for p in prompts]), [1] * len(prompts), cache)  # a 1-token pre-fill
        for t in range(1, max(PROMPT_LENS)):
            lens = [int(t < len(p)) for p in prompts]
            logits = model(torch.tensor([p[t] for p in prompts if t < len(p)]), lens, cache)
            expected = torch.stack([w[t] for w, n in zip(want, lens) if n])
            torch.testing.assert_close(logits, expected, msg=lambda m: f"decode step {t}: {m}")


if __name__ == "__main__":
    test_chunked_prefill_equals_one_pass()
    test_decode_past_the_window_equals_one_pass()
    print("test_generate: chunked pre-fill and decode past the window match one full pass")
