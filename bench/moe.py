"""MoE decode reads only the chosen experts: `python -m bench.moe`.

A Mixtral-shaped model (8 experts, top 2) against a dense model with the same active parameters: the
dense FFN is as wide as two experts together. Decode time per token should be close (goal: MoE within
1.3x of dense), although the MoE model holds four times the FFN weights. The two take turns, best of
REPS each (see interleaved_best).
"""
from bench.common import interleaved_best, random_model, report, setup, weight_bytes
from bench.decode import ours_ms_per_token

REPS = 5

BASE = dict(dim=1024, n_layers=4, head_dim=64, n_heads=16, n_kv_heads=4, norm_eps=1e-5, vocab_size=8000,
            sliding_window=256, rope_theta=1e6)
EXPERT_HIDDEN = 1792


def main() -> None:
    setup()
    moe = random_model(dict(BASE, hidden_dim=EXPERT_HIDDEN, moe={"num_experts": 8, "num_experts_per_tok": 2}))
    dense = random_model(dict(BASE, hidden_dim=2 * EXPERT_HIDDEN))
    models = {"dense, FFN of 2 experts' width": dense, "MoE, 8 experts, top 2": moe}
    ms = interleaved_best({name: lambda m=m: ours_ms_per_token(m, steps=48) for name, m in models.items()}, REPS)
    rows = [{"model": name, "weights MB": weight_bytes(m) / 1e6, "ms/token": ms[name]} for name, m in models.items()]
    report("moe", rows, {"MoE / dense decode time": ms["MoE, 8 experts, top 2"] / ms["dense, FFN of 2 experts' width"]},
           {"base": BASE, "expert_hidden": EXPERT_HIDDEN, "reps": REPS})


if __name__ == "__main__":
    main()
