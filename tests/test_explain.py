"""The pictures of `explain` against the masks the model really uses (xformers' own biases) and the cache's slots."""
import pytest
import torch

from mistral.backends import xformers as xf
from mistral.errors import MistralError
from mistral.explain import EMPTY, explain, kind, parse_seqlens, render_cache, render_mask, schedule, walk


def parse_grid(text: str) -> tuple[torch.Tensor, list[int]]:
    """render_mask's text -> (S, Skv) bool of the cells that show a digit, and each query row's digit."""
    rows = [line.split("|")[1].split() for line in text.splitlines() if line.lstrip().startswith("query")]
    seqs = [int(line.split()[2]) for line in text.splitlines() if line.lstrip().startswith("query")]
    for cells, b in zip(rows, seqs):  # a query only ever shows its own sequence's digit
        assert set(cells) <= {".", str(b)}, (cells, b)
    return torch.tensor([[c != "." for c in cells] for cells in rows]), seqs


def xformers_visible(step) -> torch.Tensor:
    pytest.importorskip("xformers.ops.fmha.attn_bias")  # an optional extra (pip install -e ".[gpu]")
    bias = xf.attn_bias(step.meta.mask, torch.device("cpu")).materialize(step.meta.mask.shape)
    return bias == 0


@pytest.fixture(scope="module")
def steps():
    # W=3, chunks of 4: step 1 is the first pre-fill, step 2 a chunk on a non-empty cache in which
    # seq 2 already decodes, steps 3-4 are decode, and in step 5 seq 2 sits out.
    return walk([5, 7, 2], window=3, chunk_size=4, decode_steps=3)


def test_schedule_matches_generate():
    assert schedule([5, 7, 2], 4, 1) == [[4, 4, 2], [1, 3, 1], [1, 1, 0]]
    assert schedule([3], None, 2) == [[3], [1], [1]]


def test_walk_covers_every_path(steps):
    assert [kind(s) for s in steps] == ["first pre-fill", "chunk", "decode", "decode", "decode"]
    assert steps[-1].seqlens == [1, 1, 0]


@pytest.mark.parametrize("i", [0, 1, 2, 4])  # first pre-fill, later chunk, decode, decode with a row idle
def test_grid_is_the_mask_xformers_uses(steps, i):
    grid, seqs = parse_grid(render_mask(steps[i]))
    assert torch.equal(grid, xformers_visible(steps[i]))
    assert seqs == steps[i].query_seq


@pytest.mark.parametrize("W, chunk", [(3, 4), (4, 4), (4, 3), (2, None)])
def test_each_query_sees_exactly_its_window(W, chunk):
    # The key labels come from the real cache, so this checks layout, mask and cache together.
    for step in walk([5, 7, 2], window=W, chunk_size=chunk, decode_steps=3):
        for row, b, p in zip(step.mask.tolist(), step.query_seq, step.query_pos):
            seen = {(step.key_seq[k], step.key_pos[k]) for k, v in enumerate(row) if v}
            assert seen == {(b, q) for q in range(max(0, p - W + 1), p + 1)}, (step.seqlens, b, p)


def test_written_slots_hold_position_mod_window(steps):
    W = 3
    for step in steps:
        lines = [line.split("|")[1] for line in render_cache(step).splitlines() if "seq" in line.split("|")[0]]
        for b, line in enumerate(lines):
            cells = line.split("slots")[0].split()
            assert len(cells) == W
            starred = {s: int(c[:-1]) for s, c in enumerate(cells) if c.endswith("*")}
            assert all(slot == pos % W for slot, pos in starred.items()), (b, starred)
            # a step writes the last min(n, W) of the positions it brings
            new = range(step.seen[b], step.seen[b] + step.seqlens[b])
            assert sorted(starred.values()) == list(new)[-W:] if new else not starred
            assert all(c == "-" or int(c.rstrip("*")) % W == s for s, c in enumerate(cells))


def test_unrotated_view_is_the_last_positions_in_order(steps):
    for step in steps:
        for b, row in enumerate(step.slots):
            n = step.seen[b] + step.seqlens[b]
            assert [row[s] for s in step.unrotated(b)] == list(range(max(0, n - 3), n))
            assert EMPTY not in [row[s] for s in step.unrotated(b)]


def test_parse_seqlens():
    assert parse_seqlens("5,7,2") == parse_seqlens((5, 7, 2)) == parse_seqlens([5, 7, 2]) == [5, 7, 2]
    assert parse_seqlens(4) == [4]
    assert parse_seqlens(" 5, 7") == [5, 7]
    for bad in ["5,0,2", "5,x", "", "5,-1", (3, -1), (2.5,), 2.5, None, list(range(1, 13))]:
        with pytest.raises(MistralError):
            parse_seqlens(bad)


@pytest.mark.parametrize("kwargs", [dict(sliding_window=0), dict(chunk_size=0), dict(decode_steps=-1),
                                    dict(sliding_window=2.5)])
def test_explain_rejects_bad_settings(kwargs):
    with pytest.raises(MistralError):
        explain(**kwargs)


def test_explain_prints(capsys):
    assert explain() is None
    text = capsys.readouterr().out
    assert "step 1/5, first pre-fill" in text and "step 5/5, decode" in text
    assert "query seq 1 pos 6 | . . . . . . . 1 1 1 . . ." in text  # step 2: seq 1 sees cached 4 and new 5, 6


def test_explain_writes_pictures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    explain("3,2", sliding_window=2, chunk_size=2, decode_steps=1, out=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overview.png", "step_1.png", "step_2.png", "step_3.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in tmp_path.iterdir())
