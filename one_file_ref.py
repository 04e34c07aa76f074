"""Mistral / Mixtral inference in one file: an executable spec of what the `mistral` package does.

Needs only torch, sentencepiece and safetensors. Same names and state-dict keys as the package, but
nothing clever: prompts run one at a time, the cache is a plain rolling buffer, and every mask is
written out. `python -m one_file_ref [model_path] [--max_tokens N]` prints the same greedy
completions as `python -m main demo`.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from sentencepiece import SentencePieceProcessor
from torch import nn

DEMO_PROMPTS = ["To be, or not to be, that is", "ROMEO:\nBut soft, what light", "Now is the winter of our"]


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    # None: full causal attention. A list: a pattern of windows repeated over the layers (None in it: full attention).
    sliding_window: int | list | None = None

    def window(self, layer: int) -> int | None:
        pattern = self.sliding_window if isinstance(self.sliding_window, list) else [self.sliding_window]
        return pattern[layer % len(pattern)]
    rope_theta: float | None = None  # None: 1e4 with a sliding window, else 1e6
    moe: dict | None = None  # {"num_experts": E, "num_experts_per_tok": K}, or None for a dense FFN


def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    """(end, D/2) complex rotations: channel pair m at position p turns by p * theta^(-2m/D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D), freqs_cis (T, D/2): rotate consecutive channel pairs as complex numbers."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * freqs_cis[:, None, :]).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None):
        super().__init__()
        self.args, self.window = args, window
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, freqs_cis, positions, cache):
        """x (T, dim): T new tokens of ONE sequence at `positions`. cache: this layer's RollingCache."""
        a = self.args
        T = x.shape[0]
        q = apply_rotary_emb(self.wq(x).view(T, a.n_heads, a.head_dim), freqs_cis)
        k = apply_rotary_emb(self.wk(x).view(T, a.n_kv_heads, a.head_dim), freqs_cis)
        v = self.wv(x).view(T, a.n_kv_heads, a.head_dim)
        # Keys: what the cache still holds (in position order), then the new ones.
        old_pos, old_k, old_v = cache.read()
        key_pos = torch.cat([old_pos, positions])
        keys, values = torch.cat([old_k, k]), torch.cat([old_v, v])
        cache.write(positions, k, v)
        # Each query sees the keys at positions j with i - W < j <= i: W keys, itself included.
        dist = positions[:, None] - key_pos[None, :]
        visible = dist >= 0
        if self.window is not None:
            visible &= dist < self.window
        repeat = a.n_heads // a.n_kv_heads  # grouped-query attention: query heads share kv heads
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
        scores = torch.einsum("thd,shd->hts", q.float(), keys.float()) / a.head_dim**0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), values.float()).type_as(x)
        return self.wo(out.reshape(T, -1))


class RollingCache:
    """The last `size` keys/values of one sequence in one layer. Position p lives in slot p % size."""

    def __init__(self, size: int, n_kv_heads: int, head_dim: int, dtype):
        self.size = size
        self.k = torch.zeros(size, n_kv_heads, head_dim, dtype=dtype)
        self.v = torch.zeros(size, n_kv_heads, head_dim, dtype=dtype)
        self.pos = torch.full((size,), -1)  # position held by each slot, -1 for empty

    def read(self):
        """(positions, keys, values) of the filled slots, oldest first: the unrotated cache."""
        order = torch.argsort(self.pos)
        order = order[self.pos[order] >= 0]
        return self.pos[order], self.k[order], self.v[order]

    def write(self, positions, k, v):
        # Only the last `size` positions survive; earlier ones would be overwritten at once.
        positions, k, v = positions[-self.size :], k[-self.size :], v[-self.size :]
        slots = positions % self.size
        self.pos[slots], self.k[slots], self.v[slots] = positions, k, v


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.experts = nn.ModuleList([FeedForward(args) for _ in range(args.moe["num_experts"])])
        self.gate = nn.Linear(args.dim, args.moe["num_experts"], bias=False)
        self.k = args.moe["num_experts_per_tok"]

    def forward(self, x):
        """Each token goes through its top-k experts, weighted by a softmax over those k logits."""
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            top = torch.topk(self.gate(x[t]), self.k)
            weights = top.values.float().softmax(-1).type_as(x)
            for w, e in zip(weights, top.indices.tolist()):
                out[t] += w * self.experts[e](x[t : t + 1])[0]
        return out


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None):
        super().__init__()
        self.attention = Attention(args, window)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args) if args.moe is None else MoeLayer(args)

    def forward(self, x, freqs_cis, positions, cache):
        h = x + self.attention(self.attention_norm(x), freqs_cis, positions, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, args.window(i)) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: list[int], start: int, caches: list[RollingCache]) -> torch.Tensor:
        """Logits (T, V) for `tokens` of one sequence, at positions start.. ; caches: one per layer."""
        positions = torch.arange(start, start + len(tokens))
        freqs_cis = precompute_freqs_cis(self.args.head_dim, start + len(tokens), self.args.rope_theta)[positions]
        h = self.tok_embeddings(torch.tensor(tokens))
        for layer, cache in zip(self.layers.values(), caches):
            h = layer(h, freqs_cis, positions, cache)
        return self.output(self.norm(h)).float()


def refuse(problem: str):
    """A mistake in the input ends the program as `python -m main` does: one line on stderr, exit status 2."""
    print(f"error: {problem}", file=sys.stderr)
    raise SystemExit(2)


def load(folder: Path) -> tuple[Transformer, SentencePieceProcessor]:
    """A native folder of full-precision weights in one file; the package reads the other kinds."""
    if not folder.is_dir():
        refuse(f"model folder {str(folder)!r} " + ("is not a folder" if folder.exists() else "does not exist"))
    if not (folder / "params.json").exists():
        hf = (folder / "config.json").exists()
        refuse(f"{folder} has no params.json" + (f": it is a Hugging Face folder (config.json); python -m main convert "
                                                 f"{folder} NEW_FOLDER writes it as a native one" if hf else ""))
    params = json.loads((folder / "params.json").read_text())
    if "quantization" in params:
        refuse(f"{folder} holds {params['quantization']} weights; one_file_ref reads full-precision ones (python -m "
               f"main demo {folder} reads these)")
    args = ModelArgs(**params)
    if args.rope_theta is None:
        args.rope_theta = 1e4 if args.sliding_window is not None else 1e6
    if (folder / "consolidated.safetensors").exists():
        from safetensors.torch import load_file
        state = load_file(folder / "consolidated.safetensors")
    elif not (folder / "consolidated.00.pth").exists():
        refuse(f"{folder} has no consolidated.safetensors or consolidated.00.pth (one_file_ref reads weights in one "
               "file; python -m main demo reads shards)")
    else:
        state = torch.load(folder / "consolidated.00.pth", weights_only=True, mmap=True)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval(), load_tokenizer(folder)


def load_tokenizer(folder: Path) -> SentencePieceProcessor:
    """The folder's sentencepiece file: tokenizer.model, or tokenizer.model.v3 and the like. Plain text only."""
    files = sorted(folder.glob("tokenizer.model*"))
    if not files:
        hint = "; tekken.json needs the package (python -m main demo)" if (folder / "tekken.json").exists() else ""
        refuse(f"{folder} has no sentencepiece tokenizer.model*{hint}")
    tokenizer = SentencePieceProcessor()
    tokenizer.Load(str(files[-1]))
    return tokenizer


@torch.no_grad()
def generate(prompt: str, model: Transformer, tokenizer: SentencePieceProcessor, max_tokens: int) -> str:
    """Greedy completion of one prompt: pre-fill it in one step, then decode token by token."""
    args = model.args
    tokens = [tokenizer.bos_id(), *tokenizer.encode(prompt)]
    # Each layer's cache holds its own window's keys (a layer without one: every position the run reaches).
    sizes = [args.window(i) or len(tokens) + max_tokens for i in range(args.n_layers)]
    caches = [RollingCache(size, args.n_kv_heads, args.head_dim, torch.float32) for size in sizes]
    logits = model(tokens, 0, caches)[-1]
    generated = []
    for _ in range(max_tokens):
        next_token = int(logits.argmax())
        generated.append(next_token)
        if next_token == tokenizer.eos_id():
            break
        logits = model([next_token], len(tokens) + len(generated) - 1, caches)[-1]
    return tokenizer.decode(tokens + generated)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage and error
        refuse(message)


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path", nargs="?", default=str(Path(__file__).resolve().parent / "mistral" / "assets"))
    parser.add_argument("--max_tokens", type=int, default=35)
    opts = parser.parse_args()
    if opts.max_tokens < 0:
        refuse(f"max_tokens must be a whole number >= 0, got {opts.max_tokens}")
    torch.manual_seed(0)
    model, tokenizer = load(Path(opts.model_path))
    for prompt in DEMO_PROMPTS:
        print(generate(prompt, model, tokenizer, opts.max_tokens))
        print("=" * 20)


if __name__ == "__main__":
    main()
