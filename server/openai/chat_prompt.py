"""Chat messages to the prompt the model's chat template writes.

Messages reach the template as transformers passes them: content as a string (text parts joined
by newlines), a tool call's `arguments` as a dict when they are a JSON object. A template that
knows nothing of tools (SmolLM2's, for one) would drop them, and fail on an assistant message
whose content is null; for such a template the tools are described in the system message, the
calls written into the assistant's content and the results into a user turn, all in the Hermes
format (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), which the hermes parser reads."""

from __future__ import annotations

import json
from typing import Any

from server.openai.errors import APIError
from server.openai.protocol import ChatMessage, ChatTool


def render(tokenizer, messages: list[ChatMessage], tools: list[ChatTool] | None, *,
           add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text; a template that fails is a 400 on `messages`."""
    template = tokenizer.chat_template
    if template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions with a prompt", param="messages")
    tool_dicts = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
    knows_tools = "tools" in template
    knows_calls = "tool_calls" in template
    dicts = [_message_dict(message, knows_calls) for message in messages]
    if tool_dicts and not knows_tools:
        dicts = _with_tools_described(dicts, tool_dicts)
    kwargs = dict(template_kwargs or {})
    kwargs.pop("add_generation_prompt", None)
    try:
        return tokenizer.apply_chat_template(dicts, tools=tool_dicts if knows_tools else None,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError, or a TypeError inside the template
        raise APIError(400, f"the chat template cannot render these messages: {type(exc).__name__}: {exc}",
                       param="messages") from None


def _message_dict(message: ChatMessage, knows_calls: bool) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role  # OpenAI's newer name; templates know "system"
    out: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        if not knows_calls:
            return {"role": "user", "content": f"<tool_response>\n{out['content']}\n</tool_response>"}
    if message.tool_calls:
        calls = [{"id": call.id, "type": "function",
                  "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                 for call in message.tool_calls]
        if knows_calls:
            out["tool_calls"] = calls
        else:
            written = "\n".join(_hermes_call(call["function"]) for call in calls)
            out["content"] = f"{out['content']}\n{written}" if out["content"] else written
    return out


def _hermes_call(function: dict[str, Any]) -> str:
    call = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def _arguments(text: str) -> Any:
    """A call's arguments as the templates expect them: the JSON object, else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _with_tools_described(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    described = ("You can call these functions, each given by its JSON schema:\n<tools>\n" + listed +
                 "\n</tools>\nTo call one, answer with a JSON object holding its name and arguments inside "
                 "<tool_call></tool_call> tags, one per call:\n<tool_call>\n"
                 '{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>')
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{described}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": described}, *messages]
