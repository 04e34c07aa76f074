"""Mistral and Mixtral inference in plain PyTorch: sliding-window attention, the rolling buffer KV cache, chunked
pre-fill of packed prompts, a sparse mixture of experts.

Reading order. The definition, each file importing only the ones before it:

    args.py       ModelArgs, the params.json keys
    rope.py       rotary embeddings
    attention.py  the one attention entry point, and BlockMask: which key each query sees
    cache.py      the rolling buffer cache, and the metadata of a step (a worked example)
    moe.py        the sparse mixture of experts
    model.py      the decoder; module attributes are the checkpoint's keys

Then what runs it:

    sampling.py   SamplingParams and sample()
    generate.py   Row, the state of one sequence, and Batch, one step over the rows; the generation loop
    speculate.py  drafts from a row's own text, verified in one step (speculative decoding)
    runners.py    what runs each step: the compiled step, the CPU engine, or the model
    pipeline.py   layers split over torchrun ranks
    chat.py       a conversation kept in the cache;  tools.py: tool calls read from an answer
    engine.py     continuous batching: requests join and leave the rows of one cache between steps
    api.py  server.py   OpenAI's protocol, served over HTTP
    checkpoint/   model folders: layouts, Hugging Face names, reading, loading, writing
    memory.py  device.py  quantize.py  grouped.py  compiled.py  backends/  cpu/   the engines and formats
    tokenizer.py  terminal.py  explain.py

Shape letters, one meaning each:

    B   rows of a batch (rows of the cache)         S   packed tokens of a step
    Skv packed keys of a step                       R   packed positions whose logits are returned
    H   query heads                                 Hkv key/value heads
    D   head_dim                                    V   vocabulary
    W   the model's sliding window                  N   cache slots per row (W, or fewer for a run that never
    L   layers                                          reaches W; W + spare slots for speculative decoding)
    E   experts                                     K   experts per token

Inside one matrix product (quantize.py, cpu/) the letters are BLAS's and go no further: x (M, K) times a weight
(N, K) transposed.
"""
from mistral.backends import xformers as _xformers  # noqa: F401  (registers xformers' attention for CUDA)
