"""Tool calls (function calling): the tools a model is offered, and its answer read back as calls.

mistral_common encodes the request: the tools as [AVAILABLE_TOOLS] before the last user message, earlier calls as
their assistant messages (with their ids from v3 on) and results as [TOOL_RESULTS]. A model that calls tools answers
with its [TOOL_CALLS] control token and then a JSON list, which is all this module reads:

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    -> [{"id": "x7Kp2QaZ9", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]

An answer is a call only if it starts with the token itself (matched by id, never by text: a model that writes
"[TOOL_CALLS]" as text wrote text) and what follows is such a list; anything else, arguments that are not JSON
included, stays the answer's text. Each call gets a 9-character id of letters and digits (the model's own, where it
wrote one), the form mistral_common requires when the call and its result come back in the next request.

Versions: v2, v3, v7 and tekken's v3 write calls this way. v1 has no tools; later tekken versions write
`[TOOL_CALLS]name[ARGS]{...}`, which is not read here, so their tools are refused rather than misread.
"""
import json
import re
import secrets
import string

from mistral.errors import MistralError

CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
VERSIONS = ("v2", "v3", "v7")  # the tokenizer versions whose calls are a JSON list after [TOOL_CALLS]


def new_id() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def check_tools(tools) -> list[dict]:
    """An OpenAI tool list, checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if not isinstance(tools, list):
        raise MistralError(f"tools must be a list of {{\"type\": \"function\", \"function\": {{...}}}}, got "
                           f"{type(tools).__name__}")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise MistralError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got "
                               f"{tool!r}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
            raise MistralError(f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -, got {name!r}")
        if name in names:
            raise MistralError(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        extra = set(function) - {"name", "description", "parameters", "strict"}
        if extra:
            raise MistralError(f"tools[{i}].function has fields that are not supported: {', '.join(sorted(extra))}")
        if not isinstance(function.get("description", ""), str):
            raise MistralError(f"tools[{i}].function.description must be text")
        if not isinstance(function.get("parameters", {}), dict):
            raise MistralError(f"tools[{i}].function.parameters must be a JSON schema (an object)")
    return tools


def read_calls(text: str) -> tuple[list[dict], str] | None:
    """The calls in the text of an answer after its [TOOL_CALLS] token, and the text after their list (usually none);
    None where that text does not start with a JSON list of {"name": text, "arguments": object (or JSON text of one),
    "id"?} objects."""
    start = len(text) - len(text.lstrip())
    try:
        listed, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    if not isinstance(listed, list) or not listed:
        return None
    calls = []
    for call in listed:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or set(call) - {"name", "arguments",
                                                                                               "id"}:
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # arguments written as JSON text: kept if they are JSON
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        given = call.get("id")
        calls.append({"id": given if isinstance(given, str) and CALL_ID.fullmatch(given) else new_id(),
                      "name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)})
    return calls, text[end:]


def openai_call(call: dict) -> dict:
    """A call read from an answer ({"id", "name", "arguments"}) in OpenAI's shape, as a server sends it and a
    conversation keeps it."""
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def may_be_whole(text: str) -> bool:
    """Whether the text after [TOOL_CALLS] may now hold its whole list (it ends with "]"): when it is worth reading."""
    return text.rstrip().endswith("]")


def forced_text(choice: str | dict | None) -> str | None:
    """What a tool_choice makes an answer start with after [TOOL_CALLS]: "" for "required" (any call), the list's
    opening up to the name for a named function, None where the answer is free ("auto", "none", None)."""
    if choice == "required":
        return ""
    if isinstance(choice, dict):
        return '[{"name": ' + json.dumps(choice["function"]["name"])
    return None
