"""Chat templates: a conversation rendered into the prompt text a chat model was trained on.

The template is the model's own Jinja source (``tokenizer_config.json`` or ``chat_template.jinja``
in a checkpoint folder, ``tokenizer.chat_template`` in a GGUF file), rendered as transformers'
``apply_chat_template`` renders it: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, loop controls, a ``tojson`` filter, ``raise_exception`` and ``strftime_now``,
and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Optional

from ..errors import ArgumentError
from .files import read_json_object, resolve_inside

__all__ = ["ChatTemplate", "TINY_CHAT_TEMPLATE", "check_messages", "folder_chat_template"]

ROLES = ("system", "user", "assistant", "tool", "developer")

# The built-in random models' template: their byte tokenizer has no chat tokens, so plain markers.
TINY_CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                      "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def check_messages(messages, where: str) -> list[dict]:
    """A conversation as OpenAI's API writes it: a non-empty list of ``{"role", "content"}`` objects
    with a known role and text content. Returns plain dicts of those two keys."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ArgumentError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} objects, "
                            f"got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ArgumentError(f"{where}: messages[{i}] must be an object with 'role' and 'content', "
                                f"got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ArgumentError(f"{where}: messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ArgumentError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def _environment():
    """The Jinja environment transformers renders chat templates in."""
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for training;
        rendering just writes its body."""

        tags = {"generation"}

        def parse(self, parser) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


class ChatTemplate:
    """A chat template, compiled when first rendered (a model whose template does not parse still
    generates). ``special_tokens`` maps ``bos_token``, ``eos_token``, ... to their text; ``source``
    names where the template came from, for errors."""

    def __init__(self, template: str, special_tokens: dict[str, str], source: str):
        if not isinstance(template, str):
            raise ArgumentError(f"{source}: the chat template must be text, got {type(template).__name__}")
        self.text, self.special_tokens, self.source = template, dict(special_tokens), source
        self._compiled = None

    def render(self, messages, add_generation_prompt: bool = True, where: str = "chat") -> str:
        """The prompt text of ``messages`` (see :func:`check_messages`), ending with the assistant's
        turn opened when ``add_generation_prompt``."""
        messages = check_messages(messages, where)
        if self._compiled is None:
            try:
                self._compiled = _environment().from_string(self.text)
            except Exception as e:  # jinja2's TemplateSyntaxError, or a template too deep to compile
                raise ArgumentError(f"{self.source}: the chat template does not parse: {e}") from None
        try:
            # As transformers renders it: no tools, no documents.
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                         documents=None, **self.special_tokens)
        except Exception as e:  # raise_exception() in the template, a sandbox refusal, a type error...
            raise ArgumentError(f"{where}: the chat template of {self.source} failed on these messages: "
                                f"{type(e).__name__}: {e}") from None


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or an object with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def folder_chat_template(folder) -> Optional[ChatTemplate]:
    """The chat template of a Hugging Face checkpoint folder: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of which
    the one named "default" is taken); None when it has none."""
    config_path = resolve_inside(folder, "tokenizer_config.json", f"{folder}: tokenizer_config.json")
    config = read_json_object(config_path) if config_path.is_file() else {}
    special = {key: text for key in ("bos_token", "eos_token", "unk_token", "pad_token")
               if (text := _token_text(config.get(key))) is not None}
    jinja = resolve_inside(folder, "chat_template.jinja", f"{folder}: chat_template.jinja")
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(encoding="utf-8"), special, str(jinja))
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise ArgumentError(f"{config_path}: chat_template must be a string or a list of named templates")
    return ChatTemplate(template, special, str(config_path))
