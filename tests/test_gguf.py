"""GGUF files: llama.cpp's block formats against gguf's own dequantizers, their C products against float64, whole
models from a file against the same model built from the dequantized weights, tokenizers rebuilt from the file, and
the message of every file that cannot load.

Each test writes its own small files with gguf's writer (llama.cpp's Python package); none is committed. gguf
quantizes Q8_0 and Q4_0 but not the K-quants, so blocks are drawn at random, with scales that give weights of a useful
size: a block of any bytes is a valid block.
"""
import ctypes
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from helpers import ROOT, cli, one_error, rounded_per_group, wait_healthy
from torch import nn

import gguf
from mistral import ggml
from mistral import quantize as quantize_module
from mistral.args import ModelArgs
from mistral.checkpoint import convert, gguf as gguf_files, load_model, quantize
from mistral.cpu import kernels
from mistral.device import cpu_bf16_matmul
from mistral.errors import MistralError
from mistral.generate import generate_ids
from mistral.model import Transformer
from mistral.quantize import Int4Linear
from mistral.tokenizer import Tokenizer

TYPES = list(ggml.TYPES)  # Q4_0, Q8_0, Q4_K, Q5_K, Q6_K
K_QUANTS = {ggml.TYPES[name] for name in ("Q4_K", "Q5_K", "Q6_K")}
# What llama.cpp's converter writes a tokenizer piece's type as: sentencepiece's own numbers.
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6


def random_blocks(kind: int, N: int, K: int, seed: int = 0, std: float | None = None) -> torch.Tensor:
    """N rows of K weights of type `kind`, (N, row_bytes) uint8: random bytes, with the fp16 scales set so that the
    weights they stand for have a standard deviation of about std (default K ** -0.5)."""
    rng = np.random.default_rng(seed)
    name, per_block, nbytes = ggml.BLOCKS[kind]
    std = K ** -0.5 if std is None else std
    raw = rng.integers(0, 256, size=(N, K // per_block, nbytes), dtype=np.uint8)

    def put(at: int, value: float) -> None:  # an fp16 scale near `value` in every block, at byte `at`
        scale = (value * rng.uniform(0.5, 1.5, size=raw.shape[:2])).astype(np.float16)
        raw[..., at : at + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)

    # weight = d (q - 8), d q, d sc q - dmin m, d sc (q - 32): the typical |weight| of each, per unit of d
    if name == "Q4_0":
        put(0, std / 4.6)
    elif name == "Q8_0":
        put(0, std / 74)
    elif name in ("Q4_K", "Q5_K"):
        d = std / (144 if name == "Q4_K" else 288)
        put(0, d)
        put(2, d * (7.5 if name == "Q4_K" else 15.5))  # dmin: the mins centre the weights near 0
    else:
        put(208, std / 1150)
    return torch.from_numpy(raw.reshape(N, -1))


# ---------------------------------------------------------------------------------------------------------
# The formats

@pytest.mark.parametrize("name", TYPES)
def test_dequantize_equals_ggufs_own(name):
    kind = ggml.TYPES[name]
    raw = random_blocks(kind, 7, 512, seed=kind)
    theirs = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(kind))
    assert np.array_equal(ggml.dequantize(raw, kind).numpy(), theirs)


def test_q4_0_is_int4_unchanged():
    from mistral.quantize import int4_dequantized
    raw = random_blocks(ggml.TYPES["Q4_0"], 9, 256)
    packed, scales = ggml.q4_0_as_int4(raw)
    assert torch.equal(int4_dequantized(packed, scales, 256), ggml.dequantize(raw, ggml.TYPES["Q4_0"]))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 16, 17, 63])
def test_block_products_against_float64(c_compiler, name, M):
    """The C products (kernels.c 1c) of every row count, against x rounded as the kernels round it (per 32 for Q8_0,
    per 256 for the K-quants: helpers.rounded_per_group) times the dequantized weights in float64. N = 37 rows:
    ragged against every split."""
    kind, K = ggml.TYPES[name], 768
    w, x = random_blocks(kind, 37, K, seed=M), torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    expected = rounded_per_group(x, group=ggml.x_group(kind)) @ ggml.dequantize(w, kind).double().T
    got = kernels.matvec(x, w, torch.tensor([float(kind)]))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_a_rows_block_product_is_the_same_whatever_rows_come_with_it(c_compiler, name):
    """Each row of x gets the same bits alone as among 2 to 9 rows (a batch, a verified draft)."""
    kind, K = ggml.TYPES[name], 768
    w, x = random_blocks(kind, 37, K, seed=3), torch.randn(9, K, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([kernels.matvec(x[m : m + 1], w, torch.tensor([float(kind)])) for m in range(9)])
    for M in range(2, 10):
        assert torch.equal(kernels.matvec(x[:M], w, torch.tensor([float(kind)])), alone[:M]), M


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_past_rounded_rows_x_is_taken_as_it_is(c_compiler, name, bf16, monkeypatch):
    """Past rounded_rows rows a product takes x as it is, times the weights dequantized (in C, block_dequantize), in
    bf16 where the CPU multiplies bf16: tests.product; at rounded_rows, still x rounded. The torch forward too."""
    from mistral.cpu.linears import CGgmlLinear
    if bf16 and not cpu_bf16_matmul():
        pytest.skip("this CPU does not multiply bf16 in hardware: the fp32 case is the one it runs")
    monkeypatch.setattr(ggml, "cpu_bf16_matmul", lambda: bf16)
    monkeypatch.setattr(quantize_module, "cpu_bf16_matmul", lambda: bf16)
    kind = ggml.TYPES[name]
    w, rows = random_blocks(kind, 300, 512, seed=kind), ggml.rounded_rows(kind)
    for linear in (CGgmlLinear(w, kind, 512), ggml.GgmlLinear(w, kind, 512)):
        for M in (rows + 1, rows):
            x = torch.randn(M, 512)
            expected = product(x, ggml.dequantize(w, kind), kind)
            with torch.no_grad():
                torch.testing.assert_close(linear(x).double(), expected, **tolerance(expected, M, kind))


@pytest.mark.parametrize("build", ["portable", "avx2"])
def test_the_other_c_builds_too(c_compiler, tmp_path, build):
    """kernels.c built without -march (no AVX2: its plain C loops), and for AVX2 alone (no AVX-512 or VNNI, as the
    CPUs without them run it), against the same float64."""
    flags = ["-mavx2", "-mfma", "-mf16c"] if build == "avx2" else []
    if build == "avx2" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    so = tmp_path / f"{build}.so"
    subprocess.run(["cc", "-O2", *flags, "-shared", "-fPIC", str(kernels.SOURCE), "-o", str(so), "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    for name in ("Q8_0", "Q4_K", "Q5_K", "Q6_K"):
        kind, K, M = ggml.TYPES[name], 512, 3
        w, x = random_blocks(kind, 11, K, seed=kind), torch.randn(M, K)
        code, y = torch.tensor([float(kind)]), torch.empty(M, 11)
        ws, ss = (ctypes.c_void_p * 3)(w.data_ptr()), (ctypes.c_void_p * 3)(code.data_ptr())
        lib.matvec(ctypes.c_int(kernels.GG), ctypes.c_void_p(x.data_ptr()), ws, ss, (ctypes.c_int64 * 3)(11, 0, 0),
                   ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(M), ctypes.c_int64(K))
        expected = rounded_per_group(x, group=ggml.x_group(kind)) @ ggml.dequantize(w, kind).double().T
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        for dtype in (torch.float32, torch.bfloat16):
            weights = torch.empty(11, K, dtype=dtype)
            lib.block_dequantize(ctypes.c_int(kind), ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(weights.data_ptr()),
                                 ctypes.c_int64(11), ctypes.c_int64(K), ctypes.c_int(dtype == torch.bfloat16))
            torch.testing.assert_close(weights, ggml.dequantize(w, kind).to(dtype), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_dequantize_against_the_reference(c_compiler, name, dtype):
    """In fp32 up to an ulp (the compiler may fuse f q - b); in bf16 rounded as torch rounds that."""
    kind = ggml.TYPES[name]
    w = random_blocks(kind, 13, 768, seed=kind)
    torch.testing.assert_close(kernels.block_dequantize(w, kind, torch.empty(13, 768, dtype=dtype)),
                               ggml.dequantize(w, kind).to(dtype), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Files

# Which type each matrix gets in the mixed file: every format at least once, as a Q4_K_M file mixes them.
KINDS = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q8_0", "ffn_gate": "Q4_K",
         "ffn_down": "Q6_K", "ffn_up": "Q4_0", "token_embd": "Q4_K", "output": "Q6_K"}
PARAMS = dict(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
              vocab_size=96, sliding_window=None, rope_theta=1e4)


def write_gguf(path, args: ModelArgs, tensors: dict, tokenizer=None, merged: bool = False, **keys) -> dict:
    """A GGUF file of the model `args` describes, as llama.cpp's converter writes one: `tensors` maps GGUF names to
    fp32 arrays or (rows of blocks, type) pairs; experts are written one tensor each, or merged into
    blk.N.ffn_*_exps (E, rows, ...) when `merged`. tokenizer: a sentencepiece file whose pieces go in. keys: metadata
    to add or (None) leave out. Returns the fp32 weights each GGUF name stands for."""
    writer = gguf.GGUFWriter(str(path), keys.pop("arch", "llama"))
    meta = {"llama.context_length": 4096, "llama.embedding_length": args.dim, "llama.block_count": args.n_layers,
            "llama.feed_forward_length": args.hidden_dim, "llama.attention.head_count": args.n_heads,
            "llama.attention.head_count_kv": args.n_kv_heads, "llama.rope.freq_base": args.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": args.norm_eps, "llama.attention.key_length": args.head_dim,
            "llama.attention.value_length": args.head_dim, "llama.rope.dimension_count": args.head_dim,
            "llama.vocab_size": args.vocab_size}
    if args.moe is not None:
        meta |= {"llama.expert_count": args.moe.num_experts, "llama.expert_used_count": args.moe.num_experts_per_tok}
    meta |= {k.replace("__", "."): v for k, v in keys.items()}
    for key, value in meta.items():
        if value is not None:
            add = (writer.add_string if isinstance(value, str) else writer.add_float32 if isinstance(value, float)
                   else writer.add_uint32)
            add(key, value)
    if tokenizer is not None:
        from sentencepiece import SentencePieceProcessor
        sp = SentencePieceProcessor(model_file=str(tokenizer))
        n = sp.vocab_size()
        writer.add_tokenizer_model("llama")
        writer.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith("\u2581"))
        writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
        writer.add_token_scores([sp.get_score(i) for i in range(n)])
        writer.add_token_types([UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                                UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL for i in range(n)])
    weights = {}
    if merged:
        groups = {}
        for name in list(tensors):
            if (m := gguf_files._MERGED.fullmatch(name)):
                groups.setdefault(f"{m[1]}_exps.weight", []).append(tensors.pop(name))
        tensors |= {name: (torch.stack([t for t, _ in parts]), parts[0][1]) for name, parts in groups.items()}
    for name, t in tensors.items():
        if isinstance(t, tuple):
            raw, kind = t
            writer.add_tensor(name, raw.numpy(), raw_dtype=gguf.GGMLQuantizationType(kind))
            if kind in ggml.BLOCKS:
                weights[name] = ggml.dequantize(raw.reshape(-1, raw.shape[-1]), kind).view(*raw.shape[:-1], -1)
        else:
            writer.add_tensor(name, t.numpy())
            weights[name] = t
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def model_tensors(args: ModelArgs, kinds: dict | None = None, seed: int = 0) -> dict:
    """GGUF name -> (rows of blocks, type) for every matrix (kinds: by the name's stem, default Q8_0), or fp32 for the
    norms and routers: the tensors of a random model of `args`."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(t.shape) for n, t in Transformer(args).state_dict().items()}
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        key = gguf_files.gguf_name(name)
        if len(shape) == 1:
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("gate.weight"):  # a router: F32, as llama.cpp keeps it
            out[key] = torch.randn(shape, generator=g) * shape[1] ** -0.5
        else:
            parts = key.split(".")
            stem = parts[2] if parts[0] == "blk" else parts[0]
            kind = ggml.TYPES[(kinds or {}).get(stem, "Q8_0")]
            std = 1.0 if stem == "token_embd" else None
            out[key] = (random_blocks(kind, shape[0], shape[1], seed=seed * 1000 + i, std=std), kind)
    return out


def product(x: torch.Tensor, w: torch.Tensor, kind: int) -> torch.Tensor:
    """What a block-format product computes, written independently of the library: up to ggml.rounded_rows rows of x,
    x rounded as the kernels round it (helpers.rounded_per_group: per 256 for the K-quants, as llama.cpp's Q8_K, per
    32 for Q8_0), times the weights, in float64;
    beyond, x as it is, x and the weights rounded to bf16 where the CPU multiplies bf16 (the sums stay exact)."""
    x = x.reshape(-1, x.shape[-1])
    if len(x) <= ggml.rounded_rows(kind):
        return rounded_per_group(x, group=256 if kind in K_QUANTS else 32) @ w.double().T
    if not ggml.cpu_bf16_matmul():
        return x.double() @ w.double().T
    return (x.bfloat16().double() @ w.bfloat16().double().T).bfloat16().double()


def tolerance(expected: torch.Tensor, rows: int, kind: int) -> dict:
    """fp32 sums in another order; in bf16 (past rounded_rows on a CPU with bf16 matmul), an output that lies near
    the midpoint of two bf16 numbers may round to the other: one unit, 2^-8 of it."""
    loose = rows > ggml.rounded_rows(kind) and ggml.cpu_bf16_matmul()
    return {"rtol": 2 ** -7 if loose else 1e-5, "atol": (1e-4 if loose else 1e-5) * expected.abs().max().item()}


class Rounded(nn.Module):
    """A linear of fp32 weights that multiplies as a block format of type `kind` does (product)."""

    def __init__(self, weight: torch.Tensor, kind: int):
        super().__init__()
        self.weight, self.kind = weight, kind

    def forward(self, x):
        return product(x, self.weight, self.kind).float().view(*x.shape[:-1], -1)


def reference(args: ModelArgs, weights: dict, kinds: dict) -> Transformer:
    """The model of a file's dequantized weights (kinds: the type of each GGUF name), every product as Rounded's."""
    model = Transformer(args, max_batch_size=2)
    model.load_state_dict({name: weights[gguf_files.gguf_name(name)] for name in model.state_dict()})
    for prefix, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "gate":
                key = gguf_files.gguf_name(f"{prefix}.{child_name}.weight" if prefix else f"{child_name}.weight")
                setattr(module, child_name, Rounded(child.weight.detach(), kinds[key]))
    return model.eval()


def _expert_weights(weights: dict) -> dict:
    """weights, with each expert of a merged tensor under its own name as well."""
    out = dict(weights)
    for name, t in weights.items():
        if name.endswith("_exps.weight"):
            for e in range(t.shape[0]):
                out[name.replace("_exps.weight", f".{e}.weight")] = t[e]
    return out


@pytest.mark.parametrize("moe", [None, "one tensor each", "merged"])
def test_a_file_computes_what_its_dequantized_weights_do(c_compiler, tmp_path, moe):
    """Every product of a pre-fill, on the very x the model gave it, against that x rounded (product) times the
    dequantized weight of its GGUF name in float64; then the whole model against the model of the dequantized weights
    (every product rounding x as Rounded does): logits and greedy tokens through the CPU engine. Dense with every
    format in one file, and a mixture of experts with experts one tensor each or merged."""
    params = PARAMS | ({"moe": {"num_experts": 4, "num_experts_per_tok": 2}} if moe else {})
    args = ModelArgs.from_dict(params)
    tensors = model_tensors(args, KINDS)
    kinds = {name: t[1] for name, t in tensors.items() if isinstance(t, tuple)}  # per expert, before write_gguf merges
    weights = _expert_weights(write_gguf(tmp_path / "m.gguf", args, tensors, merged=moe == "merged"))
    model = load_model(tmp_path / "m.gguf", max_batch_size=2)
    ids = torch.randint(0, args.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    seen = []
    hooks = [m.register_forward_hook(lambda _, x, y, name=name: seen.append((name, x[0], y)))
             for name, m in model.named_modules() if isinstance(m, (ggml.GgmlLinear, Int4Linear))]
    with torch.no_grad():
        logits = model(ids.view(-1), [21, 21])
    for hook in hooks:
        hook.remove()
    experts = args.moe.num_experts if moe else 1
    assert len({name for name, _, _ in seen}) == (4 + 3 * experts) * args.n_layers + 1
    for name, x, y in seen:
        key = gguf_files.gguf_name(name + ".weight")
        expected = product(x, weights[key], kinds[key])
        torch.testing.assert_close(y.reshape(expected.shape).double(), expected,
                                   **tolerance(expected, len(expected), kinds[key]))
    ref = reference(args, weights, kinds)
    with torch.no_grad():  # a near tie of x that the two round apart moves what follows by less than this
        torch.testing.assert_close(logits, ref(ids.view(-1), [21, 21]), rtol=0, atol=0.05)
    assert generate_ids(ids.tolist(), model, max_tokens=6)[0] == generate_ids(ids.tolist(), ref, max_tokens=6,
                                                                               engine=False)[0]


ASSETS = ROOT / "mistral" / "assets"


@pytest.fixture(scope="module")
def shipped_gguf(tmp_path_factory) -> Path:
    """The shipped model written as an F32 GGUF file, its tokenizer inside."""
    args = ModelArgs.from_dict(json.loads((ASSETS / "params.json").read_text()))
    state = load_file(ASSETS / "consolidated.safetensors")
    path = tmp_path_factory.mktemp("shipped") / "shipped.gguf"
    write_gguf(path, args, {gguf_files.gguf_name(n): t.float() for n, t in state.items()},
               tokenizer=ASSETS / "tokenizer.model")
    return path


def test_the_shipped_model_as_an_f32_file_says_what_its_folder_says(shipped_gguf):
    """The shipped model as an F32 GGUF file, run by `demo` with its window: the same text."""
    folder = cli("demo", "--max_tokens", "20")
    file = cli("demo", shipped_gguf, "--max_tokens", "20", "--sliding_window", "64")
    assert folder[0] == file[0] == 0, file[2]
    assert file[1] == folder[1]
    assert "tokenizer v1 from the file, a sliding window of 64" in file[2]


def test_serve_takes_a_file(shipped_gguf):
    """`serve FILE.gguf`: a greedy completion through the openai client equals the shipped folder's own."""
    import os
    import signal
    import sys

    import openai
    from test_server import free_port

    tokenizer, model = Tokenizer.from_folder(ASSETS), load_model(ASSETS)
    prompt = tokenizer.encode("To be, or not to be")
    expected = tokenizer.decode(generate_ids([prompt], model, max_tokens=8)[0][0])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "main", "serve", shipped_gguf, "--port", str(port),
                             "--sliding_window", "64"], cwd=ROOT, env=os.environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(port, proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="shipped.gguf", prompt="To be, or not to be", max_tokens=8, temperature=0)
        assert r.choices[0].text == expected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------------
# Tokenizers

TEXT = "Hello  world!\n\tÇa va? 日本語のテキスト 🤖, Ελληνικά, код ▁x  <s> [INST]"
CHATS = [[{"role": "user", "content": "Hi there"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello! Ça va?"}, {"role": "user", "content": "Tell me more, 日本語"}]]


@pytest.mark.parametrize("name", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3",
                                  "mistral_instruct_tokenizer_241114.model.v7"])
def test_a_tokenizer_rebuilt_from_the_file_encodes_as_the_original(tmp_path, name):
    import mistral_common
    original = Tokenizer(Path(mistral_common.__file__).parent / "data" / name)
    args = ModelArgs.from_dict(PARAMS | {"vocab_size": original.n_words})
    write_gguf(tmp_path / "t.gguf", args, {}, tokenizer=original.path)
    rebuilt = Tokenizer.from_folder(tmp_path / "t.gguf")
    assert rebuilt.version == original.version
    assert rebuilt.encode(TEXT) == original.encode(TEXT)
    assert rebuilt.decode(original.encode(TEXT)) == original.decode(original.encode(TEXT))
    for chat in CHATS:
        assert rebuilt.encode_chat(chat) == original.encode_chat(chat)


def test_a_tekken_tokenizer_rebuilt_from_the_file_encodes_as_the_original(tmp_path):
    """A tekken tokenizer written into a GGUF as llama.cpp's converter writes it (gguf's vocab.py: the special tokens
    as CONTROL, then each token's bytes in GPT-2's byte alphabet, model gpt2, pre-tokenizer tekken) reads back as the
    original: text, control tokens and chats."""
    import mistral_common
    original = Tokenizer(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")
    tekken = original._tekken
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode, written out again
    alphabet = {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(b for b in range(256)
                                                                                       if b not in keep)}}
    n, specials = original.n_words, tekken.num_special_tokens
    pieces = [tekken.id_to_piece(i) for i in range(specials)]
    pieces += ["".join(alphabet[b] for b in tekken.id_to_byte_piece(i)) for i in range(specials, n)]

    def write(path, pieces):
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("tekken")
        writer.add_token_list(pieces)
        writer.add_token_types([CONTROL] * specials + [NORMAL] * (n - specials))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    rebuilt = Tokenizer.from_folder(write(tmp_path / "t.gguf", pieces))
    assert (rebuilt.version, rebuilt.n_words, rebuilt.bos_id, rebuilt.eos_id) == (
        original.version, n, original.bos_id, original.eos_id)
    assert rebuilt.encode(TEXT) == original.encode(TEXT)
    assert rebuilt.decode(original.encode(TEXT)) == original.decode(original.encode(TEXT))
    for chat in CHATS:
        assert rebuilt.encode_chat(chat) == original.encode_chat(chat)
    pieces[25] = "[ARGS]"  # a later version's special token: the version cannot be told
    with pytest.raises(MistralError, match=r"u\.gguf holds a tekken tokenizer whose special tokens are not tekken v3"):
        Tokenizer.from_folder(write(tmp_path / "u.gguf", pieces))


def test_a_tokenizer_beside_the_file_wins(tmp_path, tokenizer_file):
    args = ModelArgs.from_dict(PARAMS)
    write_gguf(tmp_path / "t.gguf", args, {})
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    assert Tokenizer.from_folder(tmp_path / "t.gguf").path == tmp_path / "tokenizer.model"


# ---------------------------------------------------------------------------------------------------------
# Converting, quantizing, and what cannot load

def test_convert_and_quantize_a_file(c_compiler, tmp_path, tokenizer_file):
    """convert writes the dequantized weights (bf16) and the file's tokenizer; quantize --to int4 keeps a Q4_0 matrix
    as it is; both folders load and agree with the file's own model."""
    args = ModelArgs.from_dict(PARAMS | {"vocab_size": Tokenizer(tokenizer_file).n_words})
    tensors = model_tensors(args, {"ffn_up": "Q4_0", "attn_q": "Q4_K"})
    weights = write_gguf(tmp_path / "m.gguf", args, tensors, tokenizer=tokenizer_file)
    convert(tmp_path / "m.gguf", tmp_path / "native")
    state = load_file(tmp_path / "native" / "consolidated.safetensors")
    assert torch.equal(state["layers.0.attention.wq.weight"], weights["blk.0.attn_q.weight"].bfloat16())
    assert (tmp_path / "native" / "tokenizer.model").read_bytes() == Tokenizer.from_folder(
        tmp_path / "m.gguf").sentencepiece_model
    quantize(tmp_path / "m.gguf", tmp_path / "int4", to="int4")
    q = load_file(tmp_path / "int4" / "consolidated.safetensors")
    packed, scales = ggml.q4_0_as_int4(tensors["blk.1.ffn_up.weight"][0])
    assert torch.equal(q["layers.1.feed_forward.w3.weight"], packed)
    assert torch.equal(q["layers.1.feed_forward.w3.scales"], scales)
    assert Tokenizer.from_folder(tmp_path / "int4").encode(TEXT) == Tokenizer(tokenizer_file).encode(TEXT)


def _file(tmp_path, name="m.gguf", kinds=None, vocab_size=PARAMS["vocab_size"], **keys):
    args = ModelArgs.from_dict(PARAMS | {"vocab_size": vocab_size})
    write_gguf(tmp_path / name, args, model_tensors(args, kinds), **keys)
    return tmp_path / name


@pytest.mark.parametrize("case, pattern", [
    ("Q4_1", r"'blk\.0\.attn_q\.weight' in m\.gguf is stored as Q4_1; this library reads F32, F16, BF16, Q4_0"),
    ("arch", r"m\.gguf holds a model of architecture 'qwen2' \(general\.architecture\); this library reads 'llama'"),
    ("key", r"m\.gguf lacks llama\.block_count, which the model needs"),
    ("scaling", r"m\.gguf asks for RoPE scaling 'yarn' \(llama\.rope\.scaling\.type\)"),
    ("shape", r"'blk\.0\.attn_q\.weight' in m\.gguf has shape \[256, 256\] but its metadata implies \[512, 256\]"),
    ("missing", r"m\.gguf lacks 'blk\.1\.ffn_up\.weight', which the model its metadata describes needs"),
])
def test_a_file_that_cannot_load_says_why_in_one_line(tmp_path, case, pattern):
    args = ModelArgs.from_dict(PARAMS)
    tensors, keys = model_tensors(args), {}
    if case == "Q4_1":  # a type this library does not read, which gguf can write
        raw = gguf.quants.quantize(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32),
                                   gguf.GGMLQuantizationType.Q4_1)
        tensors["blk.0.attn_q.weight"] = (torch.from_numpy(raw), int(gguf.GGMLQuantizationType.Q4_1))
    elif case == "arch":
        keys["arch"] = "qwen2"
    elif case == "key":
        keys["llama__block_count"] = None
    elif case == "scaling":
        keys["llama__rope__scaling__type"] = "yarn"
    elif case == "shape":
        args = ModelArgs.from_dict(PARAMS | {"head_dim": 128})  # the metadata says heads of 128, the tensors hold 64
    elif case == "missing":
        del tensors["blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "m.gguf", args, tensors, **keys)
    with pytest.raises(MistralError, match=pattern):
        load_model(tmp_path / "m.gguf")


def test_split_files_and_folders(tmp_path):
    """A folder of one model loads; two models in a folder, or a split set with a part missing, are refused."""
    (tmp_path / "one").mkdir()
    _file(tmp_path / "one")
    assert gguf_files.gguf_files(tmp_path / "one") == [tmp_path / "one" / "m.gguf"]
    (tmp_path / "two").mkdir()
    _file(tmp_path / "two", "a.gguf")
    _file(tmp_path / "two", "b.gguf")
    with pytest.raises(MistralError, match=r"holds 2 GGUF models \(a\.gguf, b\.gguf\); name the file to load"):
        gguf_files.gguf_files(tmp_path / "two")
    (tmp_path / "split").mkdir()
    _file(tmp_path / "split", "m-00001-of-00003.gguf")
    _file(tmp_path / "split", "m-00003-of-00003.gguf")
    with pytest.raises(MistralError, match=r"lacks m-00002-of-00003\.gguf \(1 of 3 parts missing\); finish the"):
        gguf_files.gguf_files(tmp_path / "split" / "m-00001-of-00003.gguf")


def test_the_commands_refuse_in_one_line(tmp_path, tokenizer_file):
    path = _file(tmp_path, kinds={"attn_q": "Q4_K"}, vocab_size=Tokenizer(tokenizer_file).n_words)
    code, _, err = cli("demo", path)
    one_error(code, err, r"m\.gguf holds no tokenizer \(tokenizer\.ggml\.model\); put the model's tekken\.json or "
              r"tokenizer\.model\.vN beside it")
    code, _, err = cli("demo", "--sliding_window", "8")
    one_error(code, err, r"--sliding_window is for GGUF files, which hold no window")
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    code, _, err = cli("demo", path, "--quantize", "int4")
    one_error(code, err, r"m\.gguf holds Q4_K and Q8_0 weights, quantized already; leave out --quantize")
