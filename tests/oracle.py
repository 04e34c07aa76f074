"""A naive Mistral/Mixtral forward written from the equations, sharing no code with the package.

It recomputes every sequence from scratch, attends with an explicit (i - W < j <= i) mask, rotates
channel pairs with cos/sin instead of complex numbers, and routes MoE tokens one at a time.
It reads the weights straight from a state dict with the native keys.
"""
import math

import torch


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    """x (T, heads, D): rotate channel pair (2m, 2m+1) at position t by t * theta^(-2m/D)."""
    T, _, D = x.shape
    out = torch.empty_like(x)
    for m in range(D // 2):
        angle = torch.arange(T, dtype=torch.float64) * theta ** (-2 * m / D)
        c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        a, b = x[:, :, 2 * m], x[:, :, 2 * m + 1]
        out[:, :, 2 * m] = a * c - b * s
        out[:, :, 2 * m + 1] = a * s + b * c
    return out


def _ffn(x, sd, prefix):
    w1, w2, w3 = (sd[f"{prefix}.{n}.weight"] for n in ("w1", "w2", "w3"))
    h = x @ w1.T
    return (h * torch.sigmoid(h) * (x @ w3.T)) @ w2.T


def oracle_logits(sd: dict, p: dict, tokens: list[int]) -> torch.Tensor:
    """Logits (T, V) in float64 for ONE sequence starting at position 0. `p` is params.json as a dict; its
    sliding_window may be a list, a pattern of windows (None: full attention) that repeats over the layers."""
    sd = {k: v.double() for k, v in sd.items()}
    H, Hkv, D, given = p["n_heads"], p["n_kv_heads"], p["head_dim"], p.get("sliding_window")
    theta = p.get("rope_theta") or (1e4 if given else 1e6)
    pattern = given if isinstance(given, list) else [given]
    T = len(tokens)
    x = sd["tok_embeddings.weight"][torch.tensor(tokens)]
    for layer in range(p["n_layers"]):
        W = pattern[layer % len(pattern)]
        allowed = torch.zeros(T, T, dtype=torch.bool)
        for i in range(T):
            for j in range(T):
                allowed[i, j] = j <= i and (W is None or i - W < j)
        pre = f"layers.{layer}"
        h = _rms(x, sd[f"{pre}.attention_norm.weight"], p["norm_eps"])
        q = _rope((h @ sd[f"{pre}.attention.wq.weight"].T).view(T, H, D), theta)
        k = _rope((h @ sd[f"{pre}.attention.wk.weight"].T).view(T, Hkv, D), theta)
        v = (h @ sd[f"{pre}.attention.wv.weight"].T).view(T, Hkv, D)
        heads = []
        for head in range(H):
            g = head // (H // Hkv)  # the kv head this query head shares
            scores = q[:, head] @ k[:, g].T / math.sqrt(D)
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, g])
        x = x + torch.cat(heads, dim=-1) @ sd[f"{pre}.attention.wo.weight"].T
        h = _rms(x, sd[f"{pre}.ffn_norm.weight"], p["norm_eps"])
        if p.get("moe") is None:
            x = x + _ffn(h, sd, f"{pre}.feed_forward")
        else:
            K = p["moe"]["num_experts_per_tok"]
            out = torch.zeros_like(h)
            for t in range(T):
                router = h[t] @ sd[f"{pre}.feed_forward.gate.weight"].T
                top = torch.topk(router, K)
                weights = torch.softmax(top.values, dim=-1)
                for w, e in zip(weights, top.indices.tolist()):
                    out[t] += w * _ffn(h[t : t + 1], sd, f"{pre}.feed_forward.experts.{e}")[0]
            x = x + out
    return _rms(x, sd["norm.weight"], p["norm_eps"]) @ sd["output.weight"].T
