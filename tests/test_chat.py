"""A conversation kept in the cache: every turn's logits equal a fresh forward over the whole conversation's ids, which
are mistral_common's encoding with the sampled answers in place; and the chat command as a user meets it."""
import logging
import shutil
from pathlib import Path

import mistral_common
import pytest
import torch
from helpers import cli, inprocess, random_model, save_folder, tiny_params

from mistral.chat import Chat
from mistral.chat import user as said
from mistral.cpu import CpuDecoder, kernels
from mistral.errors import MistralError
from mistral.generate import PREFILL_CHUNK
from mistral.tokenizer import Tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
FILES = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3",
         "v7": "mistral_instruct_tokenizer_241114.model.v7", "tekken": "tekken_240718.json"}
VOCAB = {"v1": 32000, "v3": 32768, "v7": 32768, "tekken": 131072}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: Tokenizer(DATA / file) for name, file in FILES.items()}


class Recorder:
    """Every step, in order, on the model or on the CPU engine: the ids it was fed, and the logits it gave for which of
    them."""

    def __init__(self, model):
        self.steps, self.on_engine = [], 0

        def record(module, args, kwargs, out):
            rows = kwargs.get("rows")
            self.steps.append((args[0].tolist(), list(range(len(args[0]))) if rows is None else rows, out.clone()))

        model.register_forward_hook(record, with_kwargs=True)
        model.engine_steps = self  # see engine_steps below

    def engine(self, ids, rows, out):
        self.on_engine += 1
        self.steps.append((ids.tolist(), list(range(len(ids))) if rows is None else rows, out.clone()))

    def since(self, n: int) -> tuple[list[int], list[int], torch.Tensor]:
        """The ids fed since step n, which of them have logits (counted from the first), and those logits."""
        ids, rows = [], []
        for step_ids, step_rows, _ in self.steps[n:]:
            rows += [len(ids) + r for r in step_rows]
            ids += step_ids
        return ids, rows, torch.cat([logits for _, _, logits in self.steps[n:]])


@pytest.fixture(autouse=True)
def engine_steps(monkeypatch):
    """The decode steps the CPU engine takes, recorded as the model's forwards are."""
    real = CpuDecoder.step

    def step(self, ids, seqlens, cache, rows=None):
        out = real(self, ids, seqlens, cache, rows)
        recorder = getattr(self.model, "engine_steps", None)
        if out is not None and recorder is not None:
            recorder.engine(ids, rows, out)
        return out

    monkeypatch.setattr(CpuDecoder, "step", step)


def make(version, tokenizers, window, max_tokens=6, **options):
    model = random_model(tiny_params(vocab_size=VOCAB[version], sliding_window=window, rope_theta=1e4))
    talk = Chat(model, tokenizers[version], max_tokens=max_tokens, **options)
    return model, talk, Recorder(model)


def check_turn(model, talk, rec, user, reuse=True):
    """Say `user`: the turn feeds the conversation's ids from where the cache stops matching them, and every logit of
    the turn equals the fresh forward's over the whole conversation. reuse: the cache matched all of them, so only the
    new ids were pre-filled (the last sampled id, the answer's EOS, the message with its template)."""
    before, start = list(talk.fed), len(rec.steps)
    turn = talk.say(user)
    # the conversation as this turn saw it (older turns may have been dropped to fit)
    target = talk.ids(talk.turns[:-1] + [said(user)])
    fed, rows, got = rec.since(start)
    kept = len(talk.fed) - len(fed)
    assert fed == (target + turn.answer)[kept : len(talk.fed)] and talk.fed == (target + turn.answer)[: len(talk.fed)]
    assert turn.prefilled == len(target) - kept
    if reuse:
        assert kept == len(before) and target[:kept] == before
    with torch.no_grad():
        fresh = model(torch.tensor(talk.fed), [len(talk.fed)])  # (n, V): the whole conversation in one packed pass
    assert rows[-1] == len(fed) - 1  # the last token fed was sampled from
    torch.testing.assert_close(got, fresh[kept:][rows])
    return turn


@pytest.mark.parametrize("version", ["v1", "v3", "v7", "tekken"])
def test_turn_two_on_the_kept_cache_is_a_fresh_forward(version, tokenizers, every_logit):
    model, talk, rec = make(version, tokenizers, window=None)
    turn1 = check_turn(model, talk, rec, "Hello there")
    check_turn(model, talk, rec, "And then?")
    assert rec.on_engine > 0 or not kernels.available()  # the decode steps ran on the CPU engine
    expected = tokenizers[version].encode_chat([{"role": "user", "content": "Hello there"},
                                                {"role": "assistant", "content": "-"},
                                                {"role": "user", "content": "And then?"}], [turn1.answer])
    assert talk.fed[: len(expected)] == expected


def test_an_answer_cut_off_or_ended_gets_the_eos_where_mistral_common_puts_it(tokenizers):
    model, talk, rec = make("v7", tokenizers, window=None, max_tokens=3)
    talk.say("Hello")
    answer, eos = talk.turns[0][1]["ids"], tokenizers["v7"].eos_id
    assert len(answer) == 3 and eos not in answer  # cut off by max_tokens
    ids = talk.ids(talk.turns + [said("More")])
    hello = tokenizers["v7"].encode_chat([{"role": "user", "content": "Hello"}])
    more = tokenizers["v7"].encode_chat([{"role": "user", "content": "More"}])[1:]  # without BOS
    assert ids == hello + answer + [eos] + more


@pytest.fixture
def every_logit(monkeypatch):
    """Turns compute the logits of every position they feed (prompt_logprobs), not only where they sample: so the
    tests compare all of them with the fresh forward's."""
    import functools

    import mistral.chat

    monkeypatch.setattr(mistral.chat, "generate_ids",
                        functools.partial(mistral.chat.generate_ids, prompt_logprobs=True))


@pytest.mark.parametrize("version", ["v1", "v7"])
def test_a_conversation_past_the_window_goes_on_exactly(version, tokenizers, every_logit):
    model, talk, rec = make(version, tokenizers, window=6, max_tokens=4)
    for user in ["Hello", "Tell me more", "Why?", "Once more, from the start"]:
        check_turn(model, talk, rec, user)
    assert talk.cache.slots == 6 and talk.cache.seq_pos[0] > 4 * 6


def test_turns_on_layers_with_windows_of_their_own_only_add_what_is_new(tokenizers, every_logit):
    """A window per layer: the next turn needs no cut back, so it pre-fills only its new ids, though the narrower
    layer's cache has wrapped."""
    model, talk, rec = make("v7", tokenizers, window=[5, None])
    for user in ["Hello there", "And then?", "Why so?"]:
        check_turn(model, talk, rec, user)
    assert not talk.cache.can_rewind(0) and [k.shape[2] for k in talk.cache.k] == [5, talk.cache.slots]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_turn_two_prefilled_in_chunks(chunk, tokenizers, every_logit):
    model, talk, rec = make("v3", tokenizers, window=7, max_tokens=5, chunk_size=chunk)
    check_turn(model, talk, rec, "Hello there, how are you?")
    check_turn(model, talk, rec, "And then what happened?")


@pytest.mark.parametrize("window", [None, 64, 6, [6, None], [6, 64]], ids=str)
def test_a_system_prompt_that_moves_each_turn(window, tokenizers):
    """v3 puts the system prompt in the last user message, so each turn changes the one before: the cache is cut back
    to where the ids differ (or, once it has wrapped, the whole conversation is pre-filled again), and stays exact.
    With a window per layer, the narrower layer's cache wraps first."""
    model, talk, rec = make("v3", tokenizers, window=window, max_tokens=4)
    talk.system = "Answer in verse."
    turns = [check_turn(model, talk, rec, user, reuse=False) for user in ["Hello", "And then?", "Why?"]]
    whole = turns[2].context - len(turns[2].answer) - 1  # the third turn's conversation ids
    if window == 6 or isinstance(window, list):  # wrapped: every turn reads the whole conversation again
        assert turns[2].prefilled == whole
    else:  # cut back to the previous user message, whose system prompt moved to the new one
        assert turns[2].prefilled < whole - len(turns[0].answer)


def test_a_new_system_prompt_mid_conversation(tokenizers):
    model, talk, rec = make("v7", tokenizers, window=None)
    check_turn(model, talk, rec, "Hello")
    talk.system = "Be brief."
    turn = check_turn(model, talk, rec, "Again", reuse=False)
    assert turn.prefilled > len(tokenizers["v7"].encode("Again", bos=False)) + 4  # read again from the start


def test_ctrl_c_keeps_the_answer_so_far_or_forgets_a_turn_in_prefill(tokenizers):
    model, talk, rec = make("v7", tokenizers, window=8, max_tokens=6)
    check_turn(model, talk, rec, "Hello")
    seen = []

    def stop_after_two(token):
        seen.append(token)
        if len(seen) == 2:
            raise KeyboardInterrupt

    turn = talk.say("Go on", on_token=stop_after_two)
    assert turn.stopped and turn.answer == seen
    assert talk.turns[-1] == [*said("Go on"), {"role": "assistant", "ids": seen}]
    check_turn(model, talk, rec, "And?")

    def interrupt(module, inputs, out):
        raise KeyboardInterrupt

    hook = model.register_forward_hook(interrupt)
    turn = talk.say("This one is stopped in pre-fill")
    hook.remove()
    assert turn.stopped and turn.answer == [] and talk.turns[-1][0]["content"] == "And?"
    check_turn(model, talk, rec, "Still there?", reuse=False)


def test_without_a_window_the_oldest_turns_are_dropped_to_fit(tokenizers, caplog):
    model, talk, rec = make("v7", tokenizers, window=None, max_tokens=4, context=40)
    with caplog.at_level(logging.WARNING):
        for user in ["Hello there", "Tell me more", "Why is that so?", "Once more"]:
            turn = check_turn(model, talk, rec, user, reuse=False)
            assert turn.context <= 40
    assert "dropped the oldest" in caplog.text and len(talk.turns) < 4
    with pytest.raises(MistralError, match="would not fit the conversation's limit of 40 tokens"):
        talk.say("word " * 60)


def test_chat_options_are_checked(tokenizers):
    model = random_model(tiny_params(vocab_size=32768))
    with pytest.raises(MistralError, match="has a sliding window of 5 tokens"):
        Chat(model, tokenizers["v3"], max_tokens=4, context=100)
    with pytest.raises(MistralError, match="max_tokens must be at least 1"):
        Chat(model, tokenizers["v3"], max_tokens=0)


# --- the command, as a user runs it ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for version, official in [("v3", "tokenizer.model.v3"), ("tekken", "tekken.json")]:
        folder = save_folder(random_model(tiny_params(vocab_size=VOCAB[version])), tmp_path_factory.mktemp(version))
        shutil.copy(DATA / FILES[version], folder / official)
        out[version] = folder
    return out


STATS = r"prefill \d+ tokens in [\d.]+ s \([\d,.]+ tokens/s\), decode \d+ tokens in [\d.]+ s \([\d,.]+ tokens/s\), " \
        r"context \d+ tokens"


@pytest.mark.parametrize("where", ["shipped", "v3", "tekken"])
def test_chat_answers_each_line_with_a_stats_line(where, folders):
    args = [] if where == "shipped" else [str(folders[where]), "--max_tokens", "8"]
    code, out, err = cli("chat", *args, stdin=b"Hello\nAnd then?\n")
    assert code == 0, err
    import re

    stats = [line for line in err.splitlines() if re.fullmatch(STATS, line)]
    assert len(stats) == 2, err
    contexts = [int(re.search(r"context (\d+)", line)[1]) for line in stats]
    assert contexts[1] > contexts[0]
    assert "Traceback" not in err


def test_bad_lines_get_one_line_each_and_the_session_goes_on(folders):
    code, out, err = cli("chat", folders["v3"], "--max_tokens", "3",
                         stdin=b"Hello\n\n   \n/frobnicate\n\xff\xfeabc\n/reset\n/system Be brief.\nAgain\n")
    assert code == 1, err  # some lines were refused: status 1 (README, Exit status)
    lines = err.splitlines()
    assert sum(line.startswith("error: empty message") for line in lines) == 2
    assert sum("unknown command '/frobnicate'" in line for line in lines) == 1
    assert sum("not valid UTF-8 (byte 0xff at offset 0); nothing was sent" in line for line in lines) == 1
    assert "[a new conversation]" in err and "[system prompt: 'Be brief.']" in err
    assert sum(line.startswith("prefill ") for line in lines) == 2 and "Traceback" not in err



# --- a turn that fails, a long message, a full context ------------------------------------------------------------

def fresh_answer(model, tokenizer, history, user, **options):
    """The answer of a new Chat, its cache empty, given the turns `history` and then `user`."""
    fresh = Chat(model, tokenizer, **options)
    fresh.turns = list(history)
    return fresh.say(user).answer


def fail_when(now, real=None):
    """A callable that raises MemoryError when now() is true, and otherwise calls `real` (if any)."""
    def maybe(*args, **kwargs):
        if now():
            raise MemoryError("injected")
        return real(*args, **kwargs) if real is not None else None

    return maybe


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("how", ["nan", "prefill", "decode", "engine"])
def test_a_turn_that_fails_is_forgotten(how, window, tokenizers, monkeypatch):
    """A turn that raises (non-finite logits from a damaged embedding row; a MemoryError in a layer during pre-fill or
    decode, or in the CPU engine's decode) propagates, and the next turn is what a fresh conversation without it gives:
    its logits those of a fresh forward, its answer a new Chat's. Without a window the cache goes back to before the
    failed turn (only the new turn is pre-filled); with one of 6 it wrapped: the conversation is pre-filled again."""
    tok = tokenizers["v7"]
    model, talk, rec = make("v7", tokenizers, window=window, max_tokens=4, chunk_size=3)
    check_turn(model, talk, rec, "Hello there")
    history, fed, context = list(talk.turns), list(talk.fed), talk.context
    hooks = []
    with monkeypatch.context() as m:
        if how == "nan":
            failing, error = "Hello zebra", MistralError
            others = set(talk.ids(talk.turns + [said("And then?")])) | set(talk.fed)
            bad = next(t for t in talk.ids(talk.turns + [said(failing)]) if t not in others)
            with torch.no_grad():
                model.tok_embeddings.weight[bad] = float("nan")
        else:
            failing, error = "Tell me more", MemoryError
            assert len(talk.ids(talk.turns + [said(failing)])) - len(fed) > 3  # pre-filled in two chunks at least
            calls = []
            if how == "engine":  # its second decode step, after two tokens were sampled
                if CpuDecoder.of(model) is None:
                    pytest.skip("the CPU engine does not apply here")
                m.setattr(kernels, "blocks", fail_when(lambda: len(sent) == 2, kernels.blocks))
            else:  # the second chunk of the pre-fill, or the second decode step, all on the layers
                m.setattr(CpuDecoder, "of", staticmethod(lambda model: None))
                fail = fail_when(lambda: len(calls) == 1 if how == "prefill" else len(sent) == 2)
                hooks.append(model.layers["1"].register_forward_pre_hook(lambda module, args: calls.append(fail())))
        sent = []
        with pytest.raises(error, match="non-finite logits" if how == "nan" else "injected"):
            talk.say(failing, on_token=sent.append)
        for hook in hooks:
            hook.remove()
    assert len(sent) == (0 if how in ("nan", "prefill") else 2)
    assert talk.turns == history and talk.context == context
    if window is None:  # the cache is back to before the failed turn (with a window, its chunks overwrote it)
        assert talk.fed == fed
    turn = check_turn(model, talk, rec, "And then?", reuse=window is None)
    if window is not None:  # read again from the start
        assert turn.prefilled == turn.context - len(turn.answer) - 1
    assert turn.answer == fresh_answer(model, tok, history, "And then?", max_tokens=4, chunk_size=3)


def test_a_long_message_is_prefilled_in_bounded_chunks(tokenizers):
    """A message longer than PREFILL_CHUNK, with no chunk_size given: no step feeds more than PREFILL_CHUNK tokens, and
    the turn's logits are a fresh forward's, its answer that of a Chat that pre-fills it in one step."""
    model, talk, rec = make("v7", tokenizers, window=None, max_tokens=4)
    check_turn(model, talk, rec, "Hello")
    start = len(rec.steps)
    long_message = "word " * (PREFILL_CHUNK + 100)
    turn = check_turn(model, talk, rec, long_message)
    sizes = [len(ids) for ids, _, _ in rec.steps[start:-1]]  # the last: check_turn's fresh forward, in one piece
    assert turn.prefilled > PREFILL_CHUNK + 100 and max(sizes) == PREFILL_CHUNK and sizes[1] > 1
    assert turn.answer == fresh_answer(model, tokenizers["v7"], talk.turns[:-1], long_message, max_tokens=4,
                                       chunk_size=None)


@pytest.mark.parametrize("command", ["chat", "interactive"])
def test_the_commands_prefill_in_bounded_chunks_by_default(command, folders, monkeypatch, capsys):
    """chat and interactive, with no --chunk_size: a line longer than PREFILL_CHUNK is pre-filled PREFILL_CHUNK tokens
    at a time; --chunk_size N overrides it. (demo's prompts are shorter than a chunk: its output does not change.)"""
    import inspect

    import main
    from mistral.model import Transformer

    sizes, real = [], Transformer.forward

    def forward(self, input_ids, *args, **kwargs):
        sizes.append(input_ids.shape[0])
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", forward)
    line = "word " * (PREFILL_CHUNK + 100) + "\n"
    code, out, err = inprocess(monkeypatch, capsys, command, folders["v3"], "--max_tokens", "2", stdin=line)
    assert code == 0, err
    assert max(sizes) == PREFILL_CHUNK and sum(sizes) > PREFILL_CHUNK + 100
    sizes.clear()
    code, out, err = inprocess(monkeypatch, capsys, command, folders["v3"], "--max_tokens", "2", "--chunk_size", "100",
                               stdin=line)
    assert code == 0, err
    assert max(sizes) == 100
    assert main.TYPICAL_PROMPT == PREFILL_CHUNK
    assert all(inspect.signature(f).parameters["chunk_size"].default == PREFILL_CHUNK
               for f in (main.demo, main.interactive, main.chat))


def test_a_full_context_is_refilled_once_every_several_turns(tokenizers, caplog):
    """Without a window, a conversation that reaches its limit drops its oldest turns down to about half of it: the
    whole conversation is pre-filled again at that turn, and then not for several turns. After each refill the ids are
    mistral_common's encoding of the kept turns, the logits a fresh forward's, the answer a new Chat's given them."""
    tok, limit = tokenizers["v7"], 120
    model, talk, rec = make("v7", tokenizers, window=None, max_tokens=4, context=limit)
    users = ["Tell me more", "Why is that so?", "And then?", "Go on, please"]
    refills = []
    with caplog.at_level(logging.WARNING):
        for i in range(30):
            user, history, caplog.records[:] = users[i % len(users)], list(talk.turns), []
            turn = check_turn(model, talk, rec, user, reuse=False)
            whole = turn.context - len(turn.answer) - 1  # the ids of the conversation this turn answered
            assert turn.context <= limit
            if i == 0 or turn.prefilled <= 12:  # the first turn, or only the new ids: the last answer's end, user
                assert not caplog.records
                continue
            refills.append(i)
            kept = talk.turns[:-1]
            assert len(kept) < len(history) and kept == history[len(history) - len(kept):]
            # All but the ids the kept turns begin with as the dropped ones did (BOS, [INST]): they stayed.
            assert whole - 3 <= turn.prefilled < whole and whole <= limit // 2
            messages = []
            for (asked, answer) in kept:
                messages += [asked, {"role": "assistant", "content": "-"}]
            expected = tok.encode_chat(messages + said(user), [answer["ids"] for _, answer in kept])
            assert talk.fed[:whole] == expected and len(expected) == whole
            assert turn.answer == fresh_answer(model, tok, kept, user, max_tokens=4, context=limit)
            dropped = len(history) - len(kept)
            assert f"dropped the oldest {dropped} turn{'s' * (dropped != 1)}, {whole} tokens remain" in caplog.text
    assert len(refills) >= 3 and all(b - a >= 4 for a, b in zip(refills, refills[1:])), refills
