"""Place the learnable prompt inside a tokenizer's chat template.

The template is rendered once with a marker where the prompt goes. The text before and after
the marker then serves as fixed prefix and suffix, and the output after them is the assistant's
reply.
"""

from __future__ import annotations

from typing import Literal

ChatRole = Literal["none", "system", "user"]

# A marker that no chat template writes and no prefix or suffix is likely to contain.
_MARKER = "\x00sdlm-prompt\x00"


def chat_frame(tokenizer, role: ChatRole, prefix: str = "", suffix: str = "", user_message: str = "") -> tuple[str, str]:
    """Return the (prefix, suffix) texts around the prompt for `role`.

    role "user": the user message is prefix + prompt + suffix. role "system": the system
    message is prefix + prompt + suffix and `user_message` follows as the user's turn.
    role "none" returns (prefix, suffix) unchanged. Raises ValueError when the tokenizer has
    no chat template.
    """
    if role == "none":
        return prefix, suffix
    if role not in ("system", "user"):
        raise ValueError(f"chat role must be none, system or user, got {role!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set prompt.chat to none")
    content = prefix + _MARKER + suffix
    if role == "user":
        messages = [{"role": "user", "content": content}]
    else:
        messages = [{"role": "system", "content": content}, {"role": "user", "content": user_message}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(_MARKER) != 1:
        raise ValueError(f"the chat template placed the {role} message {text.count(_MARKER)} times; expected once")
    before, after = text.split(_MARKER)
    return before, after
