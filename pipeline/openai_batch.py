"""The OpenAI Batch API file format, in and out (README "Input and output formats"), so tooling for
OpenAI's batch files reads and writes ours.

`request_row` turns a request line into the pipeline's columns: the id (custom_id), the prompt,
the `url` (kept: the answer takes the endpoint's shape) and row_settings.py's per-row settings.
Chat messages become Persimmon's chat format; system (or developer) messages may only come first,
their text before the first turn (the chat model has no system role). A field left out takes the
run's setting, not OpenAI's default; `model` is ignored; a request for what the engine does not
do (`n` > 1, tools, streaming, penalties, `echo`) is the row's error, not silently changed.
Chat `logprobs` + `top_logprobs` (0-20) or completions `logprobs: N` is the row's `logprobs`;
vLLM's `prompt_logprobs: 0` (or true) its `prompt_logprobs` (false turns off the run's).

`response_line` turns an output row into an answer line, or for a failed row an `error` of its
`error_kind` and `error`. Log-probabilities take the endpoint's OpenAI shape; prompt
log-probabilities go where vLLM's server puts them, `rank` null (prompt tokens are not ranked).
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from .errors import RowError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
_UNSUPPORTED = {  # body field -> the values that are fine (the default meaning)
    "n": (None, 1), "stream": (None, False),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
}


class RequestError(ValueError):
    """A request this pipeline cannot serve; its message is the row's error."""


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{where}: only text content is supported, got a {kind!r} part")
        return "".join(part["text"] for part in content)
    raise RequestError(f"{where}: content must be a string or a list of text parts")


def render_chat(messages: Any) -> str:
    """Chat messages -> one Persimmon chat prompt (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("body.messages must be a non-empty list")
    system, turns = [], []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{k}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role == "assistant" and content is None:  # allowed by the API (a turn that only called tools)
            content = ""
        text = _text(content, f"messages[{k}]")
        if role in ("system", "developer"):
            if turns:
                raise RequestError(f"messages[{k}]: a {role} message may only come before the conversation")
            system.append(text)
        elif role in ("user", "assistant"):
            want = "user" if len(turns) % 2 == 0 else "assistant"
            if role != want:
                raise RequestError(f"messages[{k}]: expected a {want} message (turns alternate, starting "
                                   f"with the user), got {role}")
            turns.append(text)
        else:
            raise RequestError(f"messages[{k}]: unsupported role {role!r}")
    if len(turns) % 2 == 0:
        raise RequestError("the last message must be the user's")
    out = "".join(s + "\n\n" for s in system)
    for k in range(0, len(turns) - 1, 2):
        out += f"human: {turns[k]}\n\nadept: {turns[k + 1]}\n\n"
    return out + f"human: {turns[-1]}\n\nadept:"


def _schema(response_format: Any) -> dict | None:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if response_format is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError("response_format json_schema needs json_schema.schema (an object)")
        return spec["schema"]
    raise RequestError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")


def request_row(obj: dict, id_column: str, prompt_column: str) -> tuple[dict, RowError | None]:
    """One request line -> (the row's columns, its error or None). The row keeps its custom_id
    even when the request is bad, so its answer can say which request failed."""
    custom_id = obj.get("custom_id")
    row: dict = {id_column: custom_id, "url": obj.get("url")}
    try:
        if not isinstance(custom_id, str) or not custom_id:
            raise RequestError("custom_id must be a non-empty string")
        if obj.get("method", "POST") != "POST":
            raise RequestError(f"method must be POST, got {obj.get('method')!r}")
        url, body = obj.get("url"), obj.get("body")
        if url not in (CHAT, COMPLETIONS):
            raise RequestError(f"url must be {CHAT} or {COMPLETIONS}, got {url!r}")
        if not isinstance(body, dict):
            raise RequestError("body must be an object")
        for name, fine in _UNSUPPORTED.items():
            if name in body and body[name] not in fine:
                raise RequestError(f"body.{name}={body[name]!r:.40} is not supported")
        if url == CHAT:
            prompt = render_chat(body.get("messages"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise RequestError("body.prompt must be one string (send one request per prompt)")
        row[prompt_column] = prompt
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        settings = {"max_new_tokens": limit, "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                    "stop": body.get("stop"), "seed": body.get("seed"),
                    "json_schema": _schema(body.get("response_format")), "logprobs": _logprobs(url, body),
                    "prompt_logprobs": _prompt_logprobs(body.get("prompt_logprobs"))}
        row.update({k: v for k, v in settings.items() if v is not None})
    except RequestError as e:
        return row, RowError("invalid_request", str(e))
    return row, None


def _logprobs(url: str, body: dict) -> int | None:
    """The row's `logprobs` setting (top alternatives per token, None = off) from a request:
    chat `logprobs: true` + `top_logprobs`, completions `logprobs: N` (checked as a setting)."""
    if url == COMPLETIONS:
        if "top_logprobs" in body:
            raise RequestError("body.top_logprobs belongs to chat completions; /v1/completions takes logprobs: N")
        return body.get("logprobs")
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise RequestError(f"body.logprobs must be true or false, got {wanted!r:.40}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise RequestError(f"body.top_logprobs must be an integer in [0, 20], got {top!r:.40}")
    if top and not wanted:
        raise RequestError("body.top_logprobs needs body.logprobs: true")
    return (top or 0) if wanted else None


def _prompt_logprobs(value: Any) -> bool | None:
    """vLLM's `prompt_logprobs` request field: 0 or true asks for them, false does not even under
    a run with --prompt-logprobs (None, the field left out = the run's setting)."""
    if value is None or value is False:
        return value
    if value is True or (isinstance(value, int) and value == 0):
        return True
    if isinstance(value, int) and 0 < value <= 20:
        raise RequestError(f"body.prompt_logprobs={value}: alternatives for prompt tokens are not offered; "
                           "use 0 (each prompt token's own log-probability)")
    raise RequestError(f"body.prompt_logprobs must be 0 or true, got {value!r:.40}")


def _vllm_prompt_logprobs(tokens: list[dict]) -> list:
    return [None if t["logprob"] is None else
            {str(t["token_id"]): {"logprob": t["logprob"], "rank": None, "decoded_token": t["token"]}}
            for t in tokens]


def token_bytes(token: str) -> list[int]:
    """The UTF-8 bytes of a token's text; `"bytes:\\xe2\\x82"` (part of a character) are those bytes."""
    if token.startswith("bytes:\\x"):
        return [int(h[:2], 16) for h in token[len("bytes:"):].split("\\x")[1:]]
    return list(token.encode("utf-8"))


def _chat_logprobs(tokens: list[dict] | None) -> dict | None:
    if tokens is None:
        return None

    def one(t):
        return {"token": t["token"], "logprob": t["logprob"], "bytes": token_bytes(t["token"])}

    return {"content": [{**one(t), "top_logprobs": [one(a) for a in t["top"] or []]} for t in tokens],
            "refusal": None}


def _completion_logprobs(tokens: list[dict] | None) -> dict | None:
    if tokens is None:
        return None
    texts = [t["token"] for t in tokens]
    return {"tokens": texts, "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{a["token"]: a["logprob"] for a in t["top"] or []} for t in tokens],
            "text_offset": [0, *itertools.accumulate(map(len, texts))][:len(texts)]}


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def request_error(message: str) -> str:
    """A per-row setting error in the request's own terms (max_tokens, not max_new_tokens)."""
    return message.replace("max_new_tokens", "max_tokens").replace("json_schema", "response_format")


def response_line(row: dict, id_column: str, model: str, created: int) -> dict:
    """One output row -> one line of an OpenAI batch output file. Ids are derived from the
    custom_id and the model, so a rerun writes the same ids."""
    custom_id, error = row.get(id_column), row.get("error")
    # a failed row's error names its line, so unreadable lines (custom_id null) get distinct ids too
    key = _short_hash(str(custom_id), model) if error is None else _short_hash(str(custom_id), error, model)
    line = {"id": f"batch_req_{key}", "custom_id": custom_id}
    if error is not None:
        return {**line, "response": None, "error": {"code": row.get("error_kind"), "message": error}}
    usage = {"prompt_tokens": row.get("num_prompt_tokens") or 0,
             "completion_tokens": row.get("num_generated_tokens") or 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    reason = "length" if row.get("finish_reason") == "length" else "stop"
    text, completions = row.get("completion") or "", row.get("url") == COMPLETIONS
    if completions:
        choice = {"index": 0, "text": text, "logprobs": _completion_logprobs(row.get("logprobs")),
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": _chat_logprobs(row.get("logprobs")), "finish_reason": reason}
    body = {"id": f"cmpl-{key}" if completions else f"chatcmpl-{key}",
            "object": "text_completion" if completions else "chat.completion",
            "created": created, "model": model, "choices": [choice], "usage": usage}
    if row.get("prompt_logprobs") is not None:  # where vLLM's server puts them
        (choice if completions else body)["prompt_logprobs"] = _vllm_prompt_logprobs(row["prompt_logprobs"])
    return {**line, "response": {"status_code": 200, "request_id": f"req_{key}", "body": body}, "error": None}
