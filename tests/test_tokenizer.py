"""Tokenizers of the released models (the files mistral_common ships in its data/ folder) found in model folders, and
chat encodings checked against mistral_common's own encode_chat_completion."""
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import mistral_common
import pytest
from helpers import ROOT, random_model, save_folder, tiny_params
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import main
from mistral import checkpoint
from mistral.errors import MistralError
from mistral.tokenizer import Tokenizer, find

DATA = Path(mistral_common.__file__).parent / "data"
# The released tokenizer files, under the name an official download gives them, with their version and vocabulary.
RELEASED = {
    "v1": ("tokenizer.model.v1", "tokenizer.model", "v1", 32000),
    "v2": ("mistral_instruct_tokenizer_240216.model.v2", "tokenizer.model.v2", "v2", 32768),
    "v3": ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3", "v3", 32768),
    "v7": ("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7", "v7", 32768),
    "tekken": ("tekken_240718.json", "tekken.json", "v3", 131072),
    "tekken-240911": ("tekken_240911.json", "tekken.json", "v3", 131072),
}

CHATS = {
    "single turn": [{"role": "user", "content": "Hello"}],
    "system prompt": [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who are you?"}],
    "three turns": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Hi there, friend."}, {"role": "user", "content": "And then?"},
                    {"role": "assistant", "content": "Nothing  more.\n"}, {"role": "user", "content": " Why? 日本 "}],
}


def reference(name: str) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(DATA / RELEASED[name][0]))


def reference_chat(mt: MistralTokenizer, messages: list[dict]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mt.encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(version, layout) -> a tiny random model folder with that released tokenizer under its official name."""
    out = {}
    for name, (file, official, _, vocab) in RELEASED.items():
        native = save_folder(random_model(tiny_params(vocab_size=vocab)), tmp_path_factory.mktemp(f"{name}-native"))
        shutil.copy(DATA / file, native / official)
        out[name, "native"] = native
        out[name, "hf"] = checkpoint.convert(native, tmp_path_factory.mktemp(f"{name}-hf") / "m", to="hf")
    return out


@pytest.mark.parametrize("layout", ["native", "hf"])
@pytest.mark.parametrize("name", RELEASED)
def test_each_released_tokenizer_is_found_and_read(name, layout, folders):
    file, official, version, vocab = RELEASED[name]
    folder = folders[name, layout]
    assert (folder / official).is_file() and find(folder) == folder / official
    tok = Tokenizer.from_folder(folder)
    assert (tok.version, tok.n_words, tok.bos_id, tok.eos_id) == (version, vocab, 1, 2)
    inner = reference(name).instruct_tokenizer.tokenizer
    for text in ["To be, or not to be", " leading space", "Héllo wörld 日本\n", "[INST] typed [/INST]"]:
        assert tok.encode(text) == inner.encode(text, bos=True, eos=False)
        assert tok.encode(text, bos=False) == inner.encode(text, bos=False, eos=False)
        assert tok.decode(tok.encode(text)) == inner.decode(inner.encode(text, bos=True, eos=False))


@pytest.mark.parametrize("layout", ["native", "hf"])
@pytest.mark.parametrize("name", ["v1", "v2", "v3", "v7", "tekken"])
def test_demo_runs_on_each_released_tokenizer(name, layout, folders, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["main", "demo", str(folders[name, layout]), "--max_tokens", "4"])
    main.main()
    out, err = capsys.readouterr()
    assert out.count("=" * 20) == 3 and "tokens generated" in err, err
    for prompt in main.DEMO_PROMPTS:
        assert prompt in out


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("name", RELEASED)
def test_encode_chat_is_mistral_commons(name, chat):
    tok = Tokenizer(DATA / RELEASED[name][0])
    assert tok.encode_chat(CHATS[chat]) == reference_chat(reference(name), CHATS[chat])


@pytest.mark.parametrize("name", RELEASED)
def test_encode_chat_takes_the_answers_ids(name):
    """Answers given as ids stand where mistral_common puts the ids of the answers' text, before each EOS."""
    tok, mt = Tokenizer(DATA / RELEASED[name][0]), reference(name)
    messages = CHATS["three turns"]
    texts = [m["content"] for m in messages if m["role"] == "assistant"]
    # mistral_common's own encoding of each assistant message: its text's ids, then EOS
    own = [mt.instruct_tokenizer.encode_assistant_message(AssistantMessage(content=t), False)[:-1] for t in texts]
    assert tok.encode_chat(messages, own) == reference_chat(mt, messages)
    answers = [[500, 501, 502], []]
    pieces, expected = _split(reference_chat(mt, messages), tok.eos_id), []
    for piece, old, new in zip(pieces, own, answers):
        assert piece[len(piece) - len(old):] == old
        expected += piece[: len(piece) - len(old)] + new + [tok.eos_id]
    assert tok.encode_chat(messages, answers) == expected + pieces[-1]


def _split(ids: list[int], eos: int) -> list[list[int]]:
    pieces, piece = [], []
    for t in ids:
        if t == eos:
            pieces.append(piece)
            piece = []
        else:
            piece.append(t)
    return pieces + [piece]


def test_v2_and_later_encode_inst_as_control_tokens():
    """The bug this replaced: with v3's file as tokenizer.model, [INST] became the plain-text ids 1501, 17057, ..."""
    v3 = Tokenizer(DATA / RELEASED["v3"][0])
    assert v3.encode_chat([{"role": "user", "content": "Hello"}]) == [1, 3, 23325, 4]
    v1 = Tokenizer(DATA / RELEASED["v1"][0])
    assert v1.encode_chat([{"role": "user", "content": "Hello"}]) == [1, *v1.encode("[INST] Hello [/INST]", bos=False)]


def test_a_renamed_later_tokenizer_is_read_by_its_pieces(tmp_path, caplog):
    shutil.copy(DATA / RELEASED["v7"][0], tmp_path / "tokenizer.model")
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_folder(tmp_path)
    assert tok.version == "v7" and "reading it as v7" in caplog.text and "tokenizer.model.v7" in caplog.text
    chat = CHATS["system prompt"]
    assert tok.encode_chat(chat) == reference_chat(reference("v7"), chat)


def test_the_same_tokenizer_under_two_names_is_one(tmp_path):
    """Hugging Face copies of Mistral 7B v0.3 carry tokenizer.model and tokenizer.model.v3, the same bytes."""
    shutil.copy(DATA / RELEASED["v3"][0], tmp_path / "tokenizer.model")
    shutil.copy(DATA / RELEASED["v3"][0], tmp_path / "tokenizer.model.v3")
    assert find(tmp_path) == tmp_path / "tokenizer.model.v3"


@pytest.mark.parametrize("files", [{"tokenizer.model": "v1", "tokenizer.model.v3": "v3"},
                                   {"tekken.json": "tekken", "tokenizer.model.v7": "v7"}])
def test_two_different_tokenizers_are_refused(files, tmp_path):
    for official, name in files.items():
        shutil.copy(DATA / RELEASED[name][0], tmp_path / official)
    with pytest.raises(MistralError, match="two different tokenizers") as e:
        find(tmp_path)
    assert all(official in str(e.value) for official in files) and "\n" not in str(e.value)


def test_folders_without_a_tokenizer_we_read(tmp_path):
    with pytest.raises(MistralError, match="looked for tekken.json, tokenizer.model.vN and tokenizer.model"):
        find(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(MistralError, match="only tokenizer.json, a Hugging Face tokenizer"):
        find(tmp_path)


def test_broken_tokenizer_files(tmp_path):
    (tmp_path / "tekken.json").write_text("{not json")
    with pytest.raises(MistralError, match="not a tekken tokenizer"):
        Tokenizer(tmp_path / "tekken.json")
    (tmp_path / "tokenizer.model.v3").write_bytes(b"\x00junk")
    with pytest.raises(MistralError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "tokenizer.model.v3")


BAD_CHATS = {
    "empty": ([], "non-empty list"),
    "not a dict": (["hello"], "message 0 must be a dict"),
    "unknown role": ([{"role": "robot", "content": "x"}], "role is one of system, user, assistant, tool"),
    "extra key": ([{"role": "user", "content": "x", "name": "me"}], "keys that are not its: name"),
    "a tool without its call's id": ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}],
                                     "tool_call_id of its call"),
    "a result with no call": ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x",
                                                                  "tool_call_id": "abcDEF123"}],
                              "mistral_common cannot encode.*Unexpected role 'tool'"),
    "arguments that are not JSON": ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
        r"tool_calls\[0\].function.arguments must be a JSON object"),
    "content and calls": ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
        "both content and tool_calls"),
    "a call id mistral_common refuses": ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "1", "tool_call_id": "call_1"}], "must be a-z, A-Z, 0-9, with a length of 9"),
    "blank content": ([{"role": "user", "content": "  "}], "needs some text"),
    "ends with the answer": ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                             "ends with 'assistant'"),
    "mistral_common's own rule": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                   {"role": "assistant", "content": "c"}, {"role": "system", "content": "d"},
                                   {"role": "user", "content": "e"}], "mistral_common cannot encode"),
}


@pytest.mark.parametrize("case", BAD_CHATS)
def test_bad_chats_get_one_line(case):
    messages, message = BAD_CHATS[case]
    with pytest.raises(MistralError, match=message) as e:
        Tokenizer(DATA / RELEASED["v3"][0]).encode_chat(messages)
    assert "\n" not in str(e.value)


def test_shipped_demo_output_is_unchanged():
    """The demo of the shipped model, byte for byte as it printed before tokenizers went through mistral_common."""
    out = subprocess.run([sys.executable, "-m", "main", "demo"], cwd=ROOT, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "tests" / "data" / "shipped_demo.txt").read_bytes()


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_one_file_ref_reads_versioned_sentencepiece_and_names_what_tekken_needs(name, folders):
    ref = subprocess.run([sys.executable, "-m", "one_file_ref", str(folders[name, "native"]), "--max_tokens", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    if name == "v3":
        assert ref.returncode == 0 and ref.stdout.count("=" * 20) == 3, ref.stderr
    else:
        assert ref.returncode != 0 and ref.stderr.strip().splitlines() == [
            f"error: {folders[name, 'native']} has no sentencepiece tokenizer.model*; tekken.json needs the package "
            "(python -m main demo)"]
