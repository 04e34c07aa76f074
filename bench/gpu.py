"""Everything a GPU session should measure, in one command: `python -m bench.gpu` (meant to take under 8 minutes on
one H100/H200, not yet timed on one: no part starts after DEADLINE_S, and the tests get what is left), or
`python -m bench.gpu --dry-run` (the same code on a CPU, tiny shapes, about 20 s; a test runs it).

1. xformers against SDPA: the logits of packed prompts, of chunked pre-fill and of decode past the window, in bf16
   and in fp16, each path's difference set against the dtype's own rounding (the same steps in fp32), and which
   steps xformers really ran (its probe may hand a kind of step to SDPA). Skipped, saying how to add it, where
   xformers is not installed.
2. The HBM roofline: the bandwidth of a big device-to-device copy, measured in this run; a batch-1 decode step
   cannot be quicker than one read of the weights at that speed.
3. A random Mistral-7B-shaped model built on the GPU (meta device, to_empty, random init: no disk), bf16: decode
   tokens/s at batch 1 and 8, eager, then as a compiled step replayed as CUDA graphs (mistral/compiled.py,
   mode="reduce-overhead"), and HF transformers' generate on a model of the same shape when it is installed.
4. Mixtral 8x7B's layers (4 of its 32, random, built on the GPU), bf16, batch-1 decode: MoeLayer, whose routing
   reads the expert counts on the host once a layer, against the grouped experts (mistral/grouped.py), eager and
   compiled, each set against one read of the weights a token uses (its 2 experts of 8, and the rest); and the
   grouped logits against MoeLayer's.
5. The test suite with --device cuda (the tests that take a device run their models there), in what time is left.

Prints one table; writes bench/results/gpu.json (--dry-run: gpu-dry-run.json; --out PATH elsewhere).
"""
import argparse
import contextlib
import copy
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import mistral.attention as attn
from mistral.backends import xformers as xf
from bench.common import RESULTS, ROOT, report
from mistral.cache import RotatingBufferCache
from mistral.checkpoint import hf_config_from_args
from mistral.compiled import CompiledDecoder
from mistral.generate import generate_ids
from mistral.grouped import group_experts
from mistral.model import ModelArgs, Transformer

SEVEN_B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5,
               vocab_size=32000, sliding_window=4096, rope_theta=1e4)  # Mistral 7B v0.1
# The backend comparison: the 7B's heads (128 channels, 4 query heads a kv head) and a short window, so that the
# prompts pass it and every kind of mask is met.
COMPARE = dict(dim=1024, n_layers=4, head_dim=128, hidden_dim=2048, n_heads=8, n_kv_heads=2, norm_eps=1e-5,
               vocab_size=4096, sliding_window=64, rope_theta=1e4)
TINY = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
            vocab_size=256, sliding_window=8, rope_theta=1e4)
MOE = {"num_experts": 8, "num_experts_per_tok": 2}
MIXTRAL = dict(dim=4096, n_layers=4, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5,
               vocab_size=32000, rope_theta=1e6, moe=MOE)  # Mixtral 8x7B's shapes, 4 of its 32 layers
PROMPT, STEPS = 64, 64  # decode: tokens of each prompt, steps timed
DEADLINE_S = 450  # no part starts after this; the tests get what is left of 8 minutes
XFORMERS_HINT = ("xformers is not installed here, so its comparisons are skipped. Each xformers release is built "
                 "for one torch release (0.0.35 for torch 2.10.0+cu128): install the one for this torch "
                 f"({torch.__version__}), e.g. pip install -e '.[gpu]' for the pair this project names, then rerun")


def row(what: str, dtype: str = "", batch: int | str = "", result: str = "", vs: str = "", ok: str = "") -> dict:
    """One line of the table: every line has the same columns, in this order."""
    return {"what": what, "dtype": dtype, "batch": batch, "result": result, "vs": vs, "ok": ok}


def build(params: dict, device: torch.device, dtype: torch.dtype, max_batch_size: int = 8) -> Transformer:
    """A model of these shapes made directly on `device`, with random weights of a useful scale: nothing is read
    from disk, and nothing is allocated anywhere else first."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_dict(dict(params)), max_batch_size=max_batch_size)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name == "tok_embeddings.weight":
                p.normal_()
            else:
                p.normal_(std=p.shape[-1] ** -0.5)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def attention_backend(name: str, device_type: str = "cuda"):
    """name "sdpa": no step goes to xformers; "xformers": every step on `device_type` may, as far as xformers' probe
    (which starts afresh) finds an operator for it; on a CPU it finds none, which the dry run shows. Yields the probe's
    verdicts, kind of bias -> None (xformers takes it) or why not."""
    kernels, verdicts, warned = dict(attn.KERNELS), xf.verdicts, xf.warned
    attn.KERNELS.clear()
    if name == "xformers":
        attn.KERNELS[device_type] = xf.attention
    xf.verdicts, xf.warned = {}, []
    try:
        yield xf.verdicts
    finally:
        attn.KERNELS.clear()
        attn.KERNELS.update(kernels)
        xf.verdicts, xf.warned = verdicts, warned


@contextlib.contextmanager
def sdpa_calls(label):
    """Yields a list that gets label() for every attention call that runs on SDPA."""
    calls, sdpa = [], attn._sdpa_attention
    attn._sdpa_attention = lambda *args: calls.append(label()) or sdpa(*args)
    try:
        yield calls
    finally:
        attn._sdpa_attention = sdpa


def three_paths(model: Transformer, mark=lambda path: None) -> dict[str, torch.Tensor]:
    """fp32 logits of packed prompts, of the same prompts pre-filled in chunks of W + 1, and of 2W decode steps after
    them (fixed tokens, so every backend decodes the same inputs). mark(path) is called as each path starts."""
    W, device, vocab = model.args.window, model.device, model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3 * W + 5, 2 * W, 7)]
    out = {}
    with torch.inference_mode():
        mark("packed")
        out["packed"] = model(torch.tensor(sum(prompts, []), device=device), [len(p) for p in prompts])
        cache = RotatingBufferCache(model.n_local_layers, 3, W, model.args.n_kv_heads, model.args.head_dim,
                                    device=device, dtype=model.dtype, windows=model.layer_windows)
        mark("chunked")
        chunks, fed = [], [0, 0, 0]
        while any(f < len(p) for f, p in zip(fed, prompts)):
            pieces = [p[f : f + W + 1] for f, p in zip(fed, prompts)]
            chunks.append(model(torch.tensor(sum(pieces, []), device=device), [len(x) for x in pieces], cache))
            fed = [f + len(x) for f, x in zip(fed, pieces)]
        out["chunked"] = torch.cat(chunks)
        tokens = torch.randint(0, vocab, (2 * W, 3), generator=g)
        mark("decode")
        out["decode"] = torch.cat([model(step.to(device), [1, 1, 1], cache) for step in tokens])
    return out


def compare_backends(device: torch.device, params: dict, rows: list, notes: dict) -> None:
    if xf.ops() is None:
        print(XFORMERS_HINT)
        notes["xformers"] = XFORMERS_HINT
        rows.append(row("xformers vs SDPA", result="skipped: xformers not installed (see the note above)"))
        return
    for dtype in (torch.bfloat16, torch.float16):
        model = build(params, device, dtype, max_batch_size=3)
        with attention_backend("sdpa"):
            sdpa, fp32 = three_paths(model), three_paths(copy.deepcopy(model).float())
        current = [None]  # the path under way
        with attention_backend("xformers", device.type) as verdicts, sdpa_calls(lambda: current[0]) as fell_back:
            xformers = three_paths(model, mark=lambda path: current.__setitem__(0, path))
        why = next((v for v in verdicts.values() if v is not None), "?")
        for path, got in xformers.items():
            ran = path not in fell_back  # every attention call of the path went to xformers
            scale = fp32[path].abs().max().item()
            diff, rounding = (got - sdpa[path]).abs().max().item(), (sdpa[path] - fp32[path]).abs().max().item()
            ok = diff <= max(2 * rounding, 1e-3 * scale)
            rows.append(row(f"xformers vs SDPA, {path}", _name(dtype),
                            result=f"max |diff| {diff:.3g}" if ran else f"SDPA ran: {why[:80]}",
                            vs=f"{_name(dtype)} rounding {rounding:.3g}, logits up to {scale:.3g}",
                            ok=("yes" if ok else "NO") if ran else "-"))
        del model


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Bytes per second a device-to-device copy moves (reads plus writes), best of 5: the memory's speed."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def decode_ms_per_step(model: Transformer, batch: int, steps: int, mode: str | None, backend: str) -> float:
    """Steady-state ms per decode step of `batch` rows (row 0's first to last token), after a warm-up run that also
    compiles and captures; mode None: eager, else a CompiledDecoder in that torch.compile mode."""
    args, vocab = model.args, model.args.vocab_size
    slots = min(PROMPT + steps + 1, args.window or PROMPT + steps + 1)
    cache = RotatingBufferCache(model.n_local_layers, batch, slots, args.n_kv_heads, args.head_dim,
                                device=model.device, dtype=model.dtype, windows=model.layer_windows)
    compiled = CompiledDecoder(model, cache, backend=backend, mode=mode) if mode != "eager" else None
    prompts = [[(7 * i + 13 * b) % vocab for i in range(PROMPT)] for b in range(batch)]

    def run() -> float:
        cache.reset()
        stamps = []
        generate_ids(prompts, model, max_tokens=steps + 1, cache=cache, compiled=compiled,
                     on_token=lambda row, token: stamps.append(time.perf_counter()) if row == 0 else None)
        return (stamps[-1] - stamps[0]) / steps * 1e3

    run()
    return run()


def hf_ms_per_step(model: Transformer, batch: int, steps: int) -> float | None:
    """ms per decode step of HF transformers' generate on a model of the same shapes (its own random weights), made
    on the same device in the same dtype; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    config = {k: v for k, v in hf_config_from_args(model.args, model.dtype).items()
              if k not in ("architectures", "model_type", "dtype")}
    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            hf = transformers.MistralForCausalLM(transformers.MistralConfig(**config)).eval()
    finally:
        torch.set_default_dtype(default)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    ids = torch.randint(0, model.args.vocab_size, (batch, PROMPT), device=model.device)

    def run(n: int) -> float:
        sync(model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(model.device)
        return time.perf_counter() - t0

    run(2)
    ms = (run(steps + 1) - run(1)) / steps * 1e3
    hf = None  # the model goes before the caller measures anything else
    return ms


def run_tests(device: torch.device, dry_run: bool, seconds: float) -> str:
    """The test suite with --device, the tests that run models on the device first; its summary line."""
    if dry_run:  # one quick test: the mechanism, not the suite
        chosen = ["tests/test_device.py", "-k", "auto_picks_fp16"]
    else:  # the tests that run models on the device first, then the rest
        chosen = ["tests/test_device.py", "tests/test_backends_xformers.py", "tests/test_grouped.py",
                  "tests/test_compiled.py", "tests/test_model.py", "tests", "test_generate.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--device={device}", *chosen]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        failed = re.findall(r"^(FAILED .*)$", done, re.M)
        return f"stopped after {seconds:.0f} s" + (f"; {len(failed)} failed so far" if failed else "")
    lines = proc.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    for line in failed:
        print(line)
    return (lines[-1] if lines else proc.stderr.strip()[-200:]).strip("= ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on a CPU with tiny shapes")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default bench/results/gpu.json)")
    parser.add_argument("--no-tests", action="store_true", help="skip the test suite")
    options = parser.parse_args(argv)
    start = time.monotonic()
    dry = options.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; python -m bench.gpu --dry-run runs the same code on a CPU")
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        torch.set_num_threads(1)  # tiny shapes: more threads only wait on each other, and on whatever else runs
    big, compare = (TINY, TINY) if dry else (SEVEN_B, COMPARE)
    # On a CPU the captured graph runs as it is (inductor's code generation takes minutes there), and there are no
    # CUDA graphs to replay.
    backend, mode = ("eager", "default") if dry else ("inductor", "reduce-overhead")
    rows, notes = [], {"params": big, "compare_params": compare, "prompt": PROMPT, "steps": STEPS, "dry_run": dry}
    torch.set_float32_matmul_precision("highest")  # the fp32 reference of the comparisons stays fp32

    compare_backends(device, compare, rows, notes)

    bandwidth = copy_bandwidth(device, (64 << 20) if dry else (4 << 30))
    rows.append(row("HBM copy (read + write)" if not dry else "memory copy (read + write)",
                    result=f"{bandwidth / 1e9:,.0f} GB/s"))
    model = build(big, device, torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    roofline_ms = weights / bandwidth * 1e3
    rows.append(row("roofline: one read of the weights", "bf16",
                    result=f"{roofline_ms:.3g} ms ({weights / 1e9:.2f} GB)"))
    steps = 8 if dry else STEPS
    ms = {}  # (who, batch) -> ms per decode step
    runs = [("eager", "ours, eager", b) for b in (1, 8)] + [(mode, f"ours, compiled ({mode})", b) for b in (1, 8)]
    for how, label, batch in runs:
        if time.monotonic() - start > DEADLINE_S:
            rows.append(row(label, "bf16", batch, "not run: out of time"))
            continue
        try:
            ms[how, batch] = decode_ms_per_step(model, batch, steps, how, backend)
        except Exception as e:  # a step that fails to compile or run on this GPU is itself the finding
            rows.append(row(label, "bf16", batch, f"failed: {type(e).__name__}: {str(e)[:120]}"))
            continue
        rows.append(decode_row(label, batch, ms[how, batch], roofline_ms))
    for batch in (1, 8):
        if time.monotonic() - start > DEADLINE_S:
            rows.append(row("HF transformers generate", "bf16", batch, "not run: out of time"))
            continue
        hf = hf_ms_per_step(model, batch, steps)
        if hf is not None:
            ms["hf", batch] = hf
            rows.append(decode_row("HF transformers generate", batch, hf, roofline_ms))
    del model
    if time.monotonic() - start > DEADLINE_S:
        rows.append(row("Mixtral layers", "bf16", 1, "not run: out of time"))
    else:
        mixture(device, dict(TINY, moe=MOE) if dry else MIXTRAL, bandwidth, steps, backend, mode, rows, ms)
    if not options.no_tests:
        left = max(60.0, (60 if dry else 480) - (time.monotonic() - start))
        rows.append(row(f"tests, --device {device.type}", result=run_tests(device, dry, left)))
    ratios = {}
    for batch in (1, 8):
        if ("eager", batch) in ms and (mode, batch) in ms:
            ratios[f"compiled / eager tokens/s, batch {batch}"] = ms["eager", batch] / ms[mode, batch]
        if ("hf", batch) in ms and ("eager", batch) in ms:
            ratios[f"ours eager / HF tokens/s, batch {batch}"] = ms["hf", batch] / ms["eager", batch]
    for how in ("eager", mode):
        if ("moe, eager", 1) in ms and (f"grouped moe, {how}", 1) in ms:
            ratios[f"Mixtral layers, grouped {how} / MoeLayer eager tokens/s"] = (ms["moe, eager", 1]
                                                                                 / ms[f"grouped moe, {how}", 1])
    notes["seconds"] = time.monotonic() - start
    notes["ms_per_step"] = {f"{who}, batch {batch}": v for (who, batch), v in ms.items()}
    notes["roofline_ms"], notes["copy_bytes_per_s"], notes["weight_bytes"] = roofline_ms, bandwidth, weights
    path = options.out or RESULTS / ("gpu-dry-run.json" if dry else "gpu.json")
    report("gpu" if not dry else "gpu-dry-run", rows, ratios, notes, path=path)


def mixture(device: torch.device, params: dict, bandwidth: float, steps: int, backend: str, mode: str, rows: list,
            ms: dict) -> None:
    """Batch-1 decode of a mixture: MoeLayer, then its experts grouped (eager, compiled); the grouped logits of a
    pre-fill against MoeLayer's, set against bf16's rounding of the same (MoeLayer in fp32 as the reference)."""
    model = build(params, device, torch.bfloat16, max_batch_size=1)
    E, K = params["moe"]["num_experts"], params["moe"]["num_experts_per_tok"]
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    used = sum(p.numel() * p.element_size() for p in model.parameters()) - experts * (E - K) // E
    roofline_ms = used / bandwidth * 1e3
    layers = params["n_layers"]
    rows.append(row(f"roofline: the weights a token uses ({layers} Mixtral layers)", "bf16",
                    result=f"{roofline_ms:.3g} ms ({used / 1e9:.2f} GB)"))
    ids = torch.tensor([(7 * i) % params["vocab_size"] for i in range(PROMPT)], device=device)
    with torch.inference_mode():
        plain = model(ids, [PROMPT])
    fp32 = copy.deepcopy(model).float()
    with torch.inference_mode():
        reference = fp32(ids, [PROMPT])
    del fp32
    label = "Mixtral layers, MoeLayer (a host read a layer), eager"
    ms["moe, eager", 1] = decode_ms_per_step(model, 1, steps, "eager", backend)
    rows.append(decode_row(label, 1, ms["moe, eager", 1], roofline_ms))
    group_experts(model)
    with torch.inference_mode():
        grouped = model(ids, [PROMPT])
    rounding = (plain - reference).abs().max().item()
    diff = (grouped - plain).abs().max().item()
    rows.append(row("Mixtral layers: grouped vs MoeLayer logits", "bf16", "", f"max |diff| {diff:.3g}",
                    f"bf16 rounding {rounding:.3g}", "ok" if diff <= 2 * rounding else "MISMATCH"))
    for how, label in (("eager", "Mixtral layers, grouped, eager"),
                       (mode, f"Mixtral layers, grouped, compiled ({mode})")):
        try:
            ms[f"grouped moe, {how}", 1] = decode_ms_per_step(model, 1, steps, how, backend)
        except Exception as e:  # a step that fails to compile or run on this GPU is itself the finding
            rows.append(row(label, "bf16", 1, f"failed: {type(e).__name__}: {str(e)[:120]}"))
            continue
        rows.append(decode_row(label, 1, ms[f"grouped moe, {how}", 1], roofline_ms))
    del model


def decode_row(label: str, batch: int, ms: float, roofline_ms: float) -> dict:
    return row(label, "bf16", batch, f"{batch * 1e3 / ms:,.1f} tokens/s",
               f"{ms / roofline_ms:.2f} x roofline ({ms:.3g} ms/step)")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")


if __name__ == "__main__":
    main()
