"""resolve_model: a ChatModel from what Session(model=...) was given."""

from __future__ import annotations

from ._protocol import ChatModel


def resolve_model(model: str | ChatModel | None = None) -> ChatModel:
    """A ChatModel from an instance (returned as is), a model name, or None (the environment)."""
    if model is None or isinstance(model, str):
        # the OpenAI-compatible model (and its parsing, errors, discovery) only when one is built
        from ._openai import OpenAIChatModel

        return OpenAIChatModel(model or None)
    if isinstance(model, ChatModel):
        return model
    raise TypeError(
        f"model must be a model name, a ChatModel (such as OpenAIChatModel) or None, "
        f"not {type(model).__name__}"
    )
