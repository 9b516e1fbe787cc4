"""YAML from people, loaded with limits: a YAML bomb is refused instead of eating the machine.

`yaml.safe_load` builds aliases as shared references, so a "billion laughs" document loads in
microseconds, and then whoever walks it (validation, rendering, JSON) expands it: a resource file
whose `metadata.name` was such a bomb grew `disaggserve render -f` past 1.9 GB. Here the text is
capped in size, and the loaded structure is walked once, counting every value as often as
aliases make it appear, with a budget far above any real resource. Every YAML reader at an edge
(CLI files, the local API's YAML bodies) goes through `load_all`.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 4 * 1024 * 1024  # an API server stores objects up to ~1.5 MiB; files hold a few
MAX_EXPANDED_VALUES = 1_000_000  # values after alias expansion; a real resource has hundreds


class YamlLimitError(ValueError):
    """The document is too large, or expands (through aliases) past the budget."""


def load_all(text: str | bytes, *, max_bytes: int = MAX_BYTES,
             max_values: int = MAX_EXPANDED_VALUES) -> list[Any]:
    """All documents (None ones included), like `yaml.safe_load_all`, within the limits."""
    if len(text) > max_bytes:
        raise YamlLimitError(f"the YAML is {len(text)} bytes; at most {max_bytes} are accepted")
    documents = list(yaml.safe_load_all(text))
    budget = max_values
    for document in documents:
        budget -= expanded_size(document, budget)
    return documents


def load(text: str | bytes, **limits: int) -> Any:
    """One document (None when empty), within the limits."""
    documents = load_all(text, **limits)
    if len(documents) > 1:
        raise YamlLimitError(f"expected one YAML document, found {len(documents)}")
    return documents[0] if documents else None


def expanded_size(value: Any, budget: int) -> int:
    """How many values `value` holds once aliases are expanded; YamlLimitError past `budget`."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > budget:
            raise YamlLimitError(
                f"the YAML expands to more than {budget} values (aliases referring to aliases, a "
                "'YAML bomb'); write the values out, or use fewer anchors")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count
