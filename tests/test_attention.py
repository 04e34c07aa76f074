"""Our masks against xformers' own attn_bias classes, and the cache metadata's worked example."""
import pytest
import torch

from mistral.attention import BlockMask, attention
from mistral.backends import xformers as xf
from mistral.cache import RotatingBufferCache, unrotate

ab = pytest.importorskip("xformers.ops.fmha.attn_bias")


def xformers_visible(bias, shape):
    return bias.materialize(shape) == 0


@pytest.mark.parametrize("window", [1, 3, 4, None])
def test_first_prefill_is_block_diagonal_causal_local(window):
    seqlens = [5, 7, 2, 1]
    ours = BlockMask(tuple(seqlens), tuple(seqlens), window)
    theirs = ab.BlockDiagonalCausalMask.from_seqlens(seqlens)
    if window:
        theirs = theirs.make_local_attention(window)
    torch.testing.assert_close(ours.materialize(), xformers_visible(theirs, ours.shape))


@pytest.mark.parametrize("window", [2, 4, None])
def test_chunk_on_cache_is_local_from_bottom_right(window):
    q, kv = [3, 1, 5, 2], [3, 5, 9, 4]  # first row has nothing cached; the others see cache + chunk
    ours = BlockMask(tuple(q), tuple(kv), window)
    theirs = ab.BlockDiagonalMask.from_seqlens(q, kv)
    theirs = theirs.make_local_attention_from_bottomright(window) if window else theirs.make_causal_from_bottomright()
    torch.testing.assert_close(ours.materialize(), xformers_visible(theirs, ours.shape))


def test_decode_over_padded_cache_rows():
    ours = BlockMask((1, 1, 1), (4, 1, 3), 4, kv_padding=4)
    theirs = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1, 1, 1], 4, [4, 1, 3])
    torch.testing.assert_close(ours.materialize(), xformers_visible(theirs, ours.shape))


@pytest.mark.parametrize("q,kv,padding", [((5, 7, 2), (5, 7, 2), None), ((3, 0, 5), (7, 0, 9), None),
                                          ((1, 1), (4, 2), 4)])
def test_the_xformers_bias_is_the_same_mask(q, kv, padding):
    ours = BlockMask(q, kv, 4, kv_padding=padding)
    bias = xf.attn_bias(ours, torch.device("cpu"))
    keep = [i for i, n in enumerate(q) if n] if padding is None else list(range(len(q)))
    cols = (torch.cat([torch.arange(sum(kv[:i]), sum(kv[: i + 1])) for i in keep]) if padding is None
            else torch.arange(ours.shape[1]))
    torch.testing.assert_close(ours.materialize()[:, cols], xformers_visible(bias, (ours.shape[0], len(cols))))


@pytest.mark.parametrize("window", [130, None])
def test_fallback_attention_equals_dense_softmax_with_materialized_mask(window):
    """The tiled SDPA path against a plain masked softmax over the whole (small) packed batch."""
    torch.manual_seed(0)
    mask = BlockMask((300, 1, 40), (300, 9, 45), window)  # several query tiles, keys sliced per tile
    S, Skv = mask.shape
    q, k, v = torch.randn(S, 4, 8), torch.randn(Skv, 2, 8), torch.randn(Skv, 2, 8)
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("shd,khd->hsk", q, k4) / 8**0.5
    scores = scores.masked_fill(~mask.materialize(), float("-inf"))
    want = torch.einsum("hsk,khd->shd", scores.softmax(-1), v4)
    torch.testing.assert_close(attention(q, k, v, mask), want)


def test_unrotate():
    assert unrotate(0, 4) == []
    assert unrotate(3, 4) == [0, 1, 2]
    assert unrotate(4, 4) == [0, 1, 2, 3]
    assert unrotate(6, 4) == [2, 3, 0, 1]
    assert unrotate(9, 4) == [1, 2, 3, 0]


def test_metadata_worked_example_in_docstring():
    cache = RotatingBufferCache(1, 3, 4, 1, 1)
    cache.seq_pos = [0, 6, 3]
    meta = cache.get_input_metadata([5, 1, 2], 4)
    assert not meta.decode
    assert meta.positions.tolist() == [0, 1, 2, 3, 4, 6, 3, 4]
    assert meta.kv_cached_src.tolist() == [6, 7, 4, 5, 8, 9, 10]
    assert meta.kv_cached_dst.tolist() == [5, 6, 7, 8, 10, 11, 12]
    assert meta.kv_new_dst.tolist() == [0, 1, 2, 3, 4, 9, 13, 14]
    assert meta.mask == BlockMask((5, 1, 2), (5, 5, 5), 4)
    assert meta.write_src.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert meta.write_dst.tolist() == [1, 2, 3, 0, 6, 11, 8]


def test_decode_metadata_reads_slots_in_place():
    cache = RotatingBufferCache(1, 3, 4, 1, 1)
    cache.seq_pos = [2, 9, 4]
    meta = cache.get_input_metadata([1, 0, 1], 4)
    assert meta.decode
    assert meta.positions.tolist() == [2, 4]
    assert [t.tolist() for t in meta.write_at] == [[0, 2], [2, 0]]  # (rows, slots) of the new keys
    assert meta.rows.tolist() == [0, 2]
    assert meta.mask == BlockMask((1, 1), (3, 4), 4, kv_padding=4, newest=(2, 0))


def _reference_memory_efficient_attention(q, k, v, attn_bias):
    """What xformers computes for (1, M, G, R, D) inputs, using the bias's own materialize()."""
    _, S, G, R, D = q.shape
    bias = attn_bias.materialize((S, k.shape[1]))  # (S, Skv): 0 or -inf
    scores = torch.einsum("sgrd,kgrd->grsk", q[0], k[0]) / D**0.5 + bias
    return torch.einsum("grsk,kgrd->sgrd", scores.softmax(-1), v[0])[None]


@pytest.mark.parametrize("case", ["prefill", "chunk", "decode"])
def test_xformers_path_plumbing_on_cpu(case, monkeypatch):
    """The CUDA path's reshapes and bias, run on CPU with a reference kernel in place of xformers'."""
    import types
    import mistral.attention as attn

    monkeypatch.setattr(xf, "ops", lambda: types.SimpleNamespace(
        memory_efficient_attention=_reference_memory_efficient_attention))
    monkeypatch.setattr(xf, "refuses", lambda *a: None)  # on a CPU no operator would take them
    torch.manual_seed(0)
    H, Hkv, D, W = 6, 2, 8, 4
    if case == "decode":
        mask = BlockMask((1, 1, 1), (4, 2, 3), W, kv_padding=W)
        k, v = torch.randn(3, Hkv, W, D), torch.randn(3, Hkv, W, D)  # cache rows as stored
    else:
        mask = BlockMask((5, 7, 2), (5, 7, 2), W) if case == "prefill" else BlockMask((3, 0, 5), (7, 0, 9), W)
        k, v = torch.randn(mask.shape[1], Hkv, D), torch.randn(mask.shape[1], Hkv, D)
    q = torch.randn(mask.shape[0], H, D)
    torch.testing.assert_close(xf.attention(q, k, v, mask), attn._sdpa_attention(q, k, v, mask))
