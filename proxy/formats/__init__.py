"""Wire formats: one module per API, each converting both ways to the canonical types."""

from __future__ import annotations

from types import ModuleType

from proxy.formats import anthropic, openai

FORMATS: dict[str, ModuleType] = {"openai": openai, "anthropic": anthropic}
