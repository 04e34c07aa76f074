"""The tokenizer of a model folder, and the chat format of its version, as Mistral's own mistral_common reads them.

The official downloads name the file by its version:

    tekken.json           tiktoken-style BPE (Mistral NeMo, Mistral Small 2501, Ministral, Pixtral); version inside
    tokenizer.model.vN    sentencepiece, version N: v3 for Mistral 7B v0.3, Mixtral 8x22B, Codestral, Mathstral; v7, ...
    tokenizer.model       sentencepiece, version 1 (Mistral 7B v0.1/v0.2, Mixtral 8x7B)

The version decides the chat format: v1 writes `[INST]` and `[/INST]` as plain text, v2 and later have control
tokens for them, v7 and later put the system prompt in `[SYSTEM_PROMPT]` tokens at the start where v2 and v3 prepend
it to the last user message (v1: to the first). `encode_chat` leaves all of that to mistral_common, so the ids are
exactly the ones the models were trained on.

Plain text goes through sentencepiece itself for .model files (which is what mistral_common does with them) and
through mistral_common for tekken; mistral_common is imported only when tekken or a chat needs it.
"""
import hashlib
import json
import logging
import re
import tempfile
from functools import cached_property
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from mistral.errors import MistralError

log = logging.getLogger(__name__)

# The sentencepiece versions mistral_common knows, in its own spelling (tokenizer.model.v7m1 is v7, multimodal m1).
_VERSIONED = re.compile(r".*\.model\.(v\d+)(m\d+)?")
ROLES = ("system", "user", "assistant", "tool")
# What encode_chat puts in place of an answer given as ids, to find where its ids go.
_PLACEHOLDER = "x"


def find(folder: Path) -> Path:
    """The one tokenizer file of a model folder (native or Hugging Face layout).

    Several names holding the same tokenizer (Hugging Face copies of Mistral 7B v0.3 carry tokenizer.model and
    tokenizer.model.v3, byte for byte the same) count as one, and the versioned name is the one read.
    """
    folder = Path(folder)
    found = ([folder / "tekken.json"] if (folder / "tekken.json").is_file() else []) + sorted(
        p for p in folder.glob("tokenizer.model.v*") if p.is_file())
    if (folder / "tokenizer.model").is_file():
        found.append(folder / "tokenizer.model")
    if not found:
        if (folder / "tokenizer.json").is_file():
            raise MistralError(f"{folder} has only tokenizer.json, a Hugging Face tokenizer, which this library does "
                               "not read; copy in the tekken.json or tokenizer.model.vN of the model it was made from")
        raise MistralError(f"{folder} has no tokenizer: looked for tekken.json, tokenizer.model.vN and tokenizer.model")
    distinct = {}
    for path in found:  # the versioned names come first, so each distinct tokenizer keeps its most specific name
        distinct.setdefault(hashlib.sha256(path.read_bytes()).digest(), path)
    if len(distinct) > 1:
        a, b = list(distinct.values())[:2]
        raise MistralError(f"{folder} holds two different tokenizers, {a.name} and {b.name}; "
                           "keep the one that came with these weights")
    return next(iter(distinct.values()))


class Tokenizer:
    """A tekken.json or a sentencepiece tokenizer.model[.vN]: encode, decode, and the chat format of its version."""

    def __init__(self, path: Path | str, proto: bytes | None = None):
        """path: the tokenizer file; or, with proto (a serialized sentencepiece model), the file it was built from."""
        self.path = path = Path(path)
        self._proto = proto
        if proto is not None:
            self._sp, self._tekken = SentencePieceProcessor(), None
            self._sp.LoadFromSerializedProto(proto)
            self.version = self._version_from_pieces(quiet=True)
            return
        if not path.is_file():
            raise MistralError(f"tokenizer {str(path)!r} does not exist; a model folder holds tekken.json, "
                               "tokenizer.model.vN or tokenizer.model")
        self._sp = self._tekken = None
        if path.suffix == ".json":
            self.version = None  # read from the file, below
            try:
                self._tekken = self._mistral_common.instruct_tokenizer.tokenizer
            except Exception as e:  # mistral_common raises many kinds: JSON, pydantic, assertions
                raise MistralError(f"{path} is not a tekken tokenizer mistral_common can read ({e})") from None
            self.version = self._tekken.version.value
            return
        self._sp = SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise MistralError(f"{path} is not a sentencepiece model ({e})") from None
        assert self._sp.vocab_size() == self._sp.get_piece_size()
        if m := _VERSIONED.fullmatch(path.name):
            self.version = m[1]
        elif path.name.endswith(".model"):
            self.version = self._version_from_pieces()
        else:
            raise MistralError(f"cannot tell the version of {path.name}: name it tokenizer.model.vN, as the official "
                               "downloads do (tokenizer.model alone is v1)")

    @staticmethod
    def from_folder(folder: Path | str) -> "Tokenizer":
        """The tokenizer of a model folder; for a GGUF file (or a folder of one), a tokenizer file beside it, else the
        one the file holds."""
        from mistral.checkpoint import gguf

        folder = Path(folder)
        if not gguf.is_gguf(folder):
            return Tokenizer(find(folder))
        beside = folder if folder.is_dir() else folder.parent
        if any(any(beside.glob(name)) for name in ("tekken.json", "tokenizer.model", "tokenizer.model.v*")):
            return Tokenizer(find(beside))
        tekken = gguf.tekken_json(folder)
        if tekken is not None:  # mistral_common reads files: one is written for it, read whole at once
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "tekken.json").write_text(json.dumps(tekken))
                tokenizer = Tokenizer(Path(tmp) / "tekken.json")
            tokenizer.path = folder
            return tokenizer
        proto = gguf.sentencepiece_model(folder)
        if proto is None:
            raise MistralError(f"{folder} holds no tokenizer (tokenizer.ggml.model); put the model's tekken.json or "
                               "tokenizer.model.vN beside it")
        return Tokenizer(folder, proto)

    def _version_from_pieces(self, quiet: bool = False) -> str:
        """v1, unless the file has the control tokens of a later version: a tokenizer.model.v3 renamed, say. Read as
        v1, its [INST] would be encoded as plain text, a prompt format the model never saw."""
        controls = {self._sp.id_to_piece(i) for i in range(min(self._sp.vocab_size(), 1000)) if self._sp.IsControl(i)}
        if "[INST]" not in controls:
            return "v1"
        version = "v7" if "[SYSTEM_PROMPT]" in controls else "v3" if "[IMG]" in controls else "v2"
        if quiet:
            return version
        log.warning("warning: %s has the control tokens of a %s tokenizer, not of v1 as its name says; reading it as "
                    "%s (rename it %s.%s to say so)", self.path, version, version, self.path.name, version)
        return version

    @property
    def sentencepiece_model(self) -> bytes:
        """The serialized sentencepiece model (a .model file's bytes)."""
        return self._proto if self._proto is not None else self.path.read_bytes()

    @property
    def n_words(self) -> int:
        return self._sp.vocab_size() if self._sp is not None else self._tekken.n_words

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id() if self._sp is not None else self._tekken.bos_id

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id() if self._sp is not None else self._tekken.eos_id

    def encode(self, s: str, bos: bool = True) -> list[int]:
        """Plain text, without any chat template: for completion."""
        if self._sp is not None:
            ids = self._sp.encode(s)
            return [self.bos_id, *ids] if bos else ids
        return self._tekken.encode(s, bos=bos, eos=False)

    def decode(self, ids: list[int]) -> str:
        """Text of ids, leaving out control tokens (BOS, EOS, [INST], ...)."""
        return self._sp.decode(ids) if self._sp is not None else self._tekken.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, as a text shows them (a sentencepiece piece's "▁" as a space; b"" for a
        control token): what a server's logprobs name each token by."""
        if self._sp is None:
            return self._tekken.id_to_byte_piece(token)
        if self._sp.IsControl(token):
            return b""
        piece = self._sp.id_to_piece(token)
        if self._sp.IsByte(token):  # <0x0A>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    @cached_property
    def _mistral_common(self):
        """mistral_common's MistralTokenizer for this file. A tokenizer.model whose version was read from its pieces is
        offered to mistral_common under the versioned name, since mistral_common takes the version from the name."""
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        if self._proto is not None:  # built from a GGUF file: mistral_common reads files, so one is written for it
            with tempfile.TemporaryDirectory() as tmp:
                built = Path(tmp) / ("tokenizer.model" if self.version == "v1" else f"tokenizer.model.{self.version}")
                built.write_bytes(self._proto)
                return MistralTokenizer.from_file(str(built))
        if self.version is None or _VERSIONED.fullmatch(self.path.name) or self.version == "v1":
            return MistralTokenizer.from_file(str(self.path))
        with tempfile.TemporaryDirectory() as tmp:
            alias = Path(tmp) / f"tokenizer.model.{self.version}"
            alias.symlink_to(self.path.resolve())
            return MistralTokenizer.from_file(str(alias))  # sentencepiece has read the whole file by now

    def encode_chat(self, messages: list[dict], answer_ids: list[list[int]] | None = None,
                    tools: list[dict] | None = None) -> list[int]:
        """The ids of a conversation, exactly as mistral_common's encode_chat_completion gives them.

        messages: OpenAI's chat messages: {"role": "system" | "user" | "assistant", "content": str}, an assistant's
        {"role": "assistant", "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]}, and a
        tool's {"role": "tool", "tool_call_id", "content"}, ending with a user or tool message. tools: OpenAI's tool
        list (tools.check_tools), offered to the model. BOS comes once; each assistant message ends with EOS; where the
        system prompt and the tools go and which template tokens surround each message depends on the version.
        answer_ids, when given, are the ids (without their EOS) of the assistant messages that have content, in
        order, to use instead of encoding their content again: what a model sampled need not be what its decoded text
        encodes to.
        """
        _check_messages(messages)
        if tools and self.tools_refusal:
            raise MistralError(self.tools_refusal)
        if answer_ids is None:
            return self._encode_chat(messages, tools)
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")]
        if len(answer_ids) != len(answers):
            raise MistralError(f"{len(answer_ids)} answer_ids for {len(answers)} assistant messages with content")
        # Each assistant message is encoded as its text's ids and then EOS: so with a placeholder for every answer,
        # each answer's EOS is the one preceded by the placeholder's ids, swapped for the answer's. (An assistant's
        # tool calls end with EOS too, after their JSON, never after the placeholder.)
        placed = [{**m, "content": _PLACEHOLDER} if i in answers else m for i, m in enumerate(messages)]
        ids = self._encode_chat(placed, tools)
        stand_in = self._placeholder_ids
        eos_at = [i for i, t in enumerate(ids) if t == self.eos_id and ids[i - len(stand_in) : i] == stand_in]
        assert len(eos_at) == len(answers), (eos_at, answers)
        out, start = [], 0
        for i, answer in zip(eos_at, answer_ids):
            out += ids[start : i - len(stand_in)] + list(answer)
            start = i
        return out + ids[start:]

    @cached_property
    def tool_calls_id(self) -> int | None:
        """The id of the [TOOL_CALLS] control token that starts an answer made of tool calls; None without one."""
        return self._special("[TOOL_CALLS]")

    def _special(self, name: str) -> int | None:
        """The id of control token `name` (mistral_common's spelling, "[INST]"), or None where this tokenizer has none
        (or names it, but as its unknown piece: v2's [PREFIX])."""
        import warnings

        inner = self._mistral_common.instruct_tokenizer.tokenizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                token = inner.get_special_token(name)
            except Exception:  # each kind of mistral_common tokenizer says "none" its own way
                return None
        return None if token == inner.unk_id else token

    @cached_property
    def tools_refusal(self) -> str | None:
        """Why this tokenizer's model cannot be offered tools here, or None where it can."""
        from mistral import tools

        if self.tool_calls_id is None:
            return f"this model's tokenizer ({self.version}) has no tool calls: tools need v2 or later, or tekken"
        if self.version not in tools.VERSIONS:
            return (f"tool calls of {self.version} tokenizers are written as [TOOL_CALLS]name[ARGS]..., which this "
                    f"library does not read yet (it reads those of {', '.join(tools.VERSIONS)})")
        return None

    @cached_property
    def fim(self) -> bool:
        """Whether this tokenizer has fill-in-the-middle's control tokens, [PREFIX] and [SUFFIX] (v3 and later, and
        tekken: Codestral's). v1 has neither; v2 names them, but they are its unknown piece."""
        return self._special("[PREFIX]") is not None and self._special("[SUFFIX]") is not None

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """The ids of a fill-in-the-middle prompt, exactly as mistral_common's encode_fim gives them: BOS, [SUFFIX],
        the suffix, [PREFIX], the prefix. The model writes the middle after them, up to EOS."""
        from mistral_common.protocol.fim.request import FIMRequest

        if not self.fim:
            raise MistralError(f"fill-in-the-middle needs a tokenizer with [PREFIX] and [SUFFIX] tokens (v3 and later, "
                               f"or tekken: Codestral's), and this one is {self.version}")
        if not isinstance(prefix, str) or not isinstance(suffix, str) or not (prefix or suffix):
            raise MistralError("fill-in-the-middle takes a prefix and a suffix, text, not both empty")
        return self._mistral_common.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens

    @cached_property
    def _placeholder_ids(self) -> list[int]:
        """The ids _PLACEHOLDER is encoded to as an assistant message: what lies between a user message and EOS."""
        user = {"role": "user", "content": "a"}
        with_answer = self._encode_chat([user, {"role": "assistant", "content": _PLACEHOLDER}, user])
        return with_answer[len(self._encode_chat([user])) : with_answer.index(self.eos_id)]

    def _encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(messages, tools=tools or None)
            return self._mistral_common.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise MistralError(f"mistral_common cannot encode this conversation: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[:2]).strip()


def _check_messages(messages: list[dict]) -> None:
    """The shapes encode_chat takes (mistral_common checks the order of the roles and the calls' ids)."""
    if not isinstance(messages, list) or not messages:
        raise MistralError("a chat is a non-empty list of {'role': ..., 'content': ...} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise MistralError(f"message {i} must be a dict whose role is one of {', '.join(ROLES)}, got {m!r}")
        role, content = m["role"], m.get("content")
        keys = {"role", "content"} | ({"tool_calls"} if role == "assistant" else set()) | (
            {"tool_call_id", "name"} if role == "tool" else set())
        if set(m) - keys:
            raise MistralError(f"message {i} ({role}) has keys that are not its: {', '.join(sorted(set(m) - keys))}")
        if role == "assistant" and m.get("tool_calls") is not None:
            _check_calls(i, m["tool_calls"])
            if content:
                raise MistralError(f"message {i} (assistant) has both content and tool_calls: a Mistral answer is one "
                                   "or the other")
        elif role == "tool":
            if not isinstance(content, str) or not isinstance(m.get("tool_call_id"), str):
                raise MistralError(f"message {i} (tool) needs its result as text content, and the tool_call_id of its "
                                   f"call, got {m!r}")
        elif not isinstance(content, str) or not content.strip():
            raise MistralError(f"message {i} ({role}) needs some text as its content, got {content!r}")
    if messages[-1]["role"] not in ("user", "tool"):
        raise MistralError(f"a chat ends with a user message (or a tool's result), the one to answer; this one ends "
                           f"with {messages[-1]['role']!r}")


def _check_calls(i: int, calls) -> None:
    if not isinstance(calls, list) or not calls:
        raise MistralError(f"message {i} (assistant): tool_calls must be a non-empty list")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not isinstance(
                function.get("arguments"), str):
            raise MistralError(f"message {i} (assistant): tool_calls[{j}] must be {{\"id\", \"type\": \"function\", "
                               f"\"function\": {{\"name\": text, \"arguments\": JSON text}}}}, got {call!r}")
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise MistralError(f"message {i} (assistant): tool_calls[{j}].function.arguments must be a JSON object as "
                               f"text, got {function['arguments']!r}")
