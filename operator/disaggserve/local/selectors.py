"""Label and field selectors as the API server understands them (for the local API)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]

_SET_TERM = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside `in (...)` sets."""
    terms, depth, current = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
    terms.append("".join(current))
    return [t.strip() for t in terms if t.strip()]


def parse_label_selector(selector: str | None) -> Predicate:
    """`a=b,c!=d,e,!f,g in (x,y),h notin (z)` -> predicate over a labels mapping.

    Raises ValueError on a selector the API server would refuse.
    """
    checks: list[Predicate] = []
    for term in _split_terms(selector or ""):
        if m := _SET_TERM.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif "!=" in term:
            key, value = (p.strip() for p in term.split("!=", 1))
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = (p.strip() for p in term.replace("==", "=").split("=", 1))
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif term.startswith("!"):
            checks.append(lambda labels, k=term[1:].strip(): k not in labels)
        elif re.fullmatch(r"[A-Za-z0-9./_-]+", term):
            checks.append(lambda labels, k=term: k in labels)
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")
    return lambda labels: all(check(labels) for check in checks)


def _field(obj: Mapping[str, Any], path: str) -> Any:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def parse_field_selector(selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """`metadata.name=x,spec.nodeName!=y` -> predicate over a whole object."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for term in _split_terms(selector or ""):
        negate = "!=" in term
        path, value = (p.strip() for p in term.replace("==", "=").split("!=" if negate else "=", 1))
        if negate:
            checks.append(lambda o, p=path, v=value: str(_field(o, p) or "") != v)
        else:
            checks.append(lambda o, p=path, v=value: str(_field(o, p) or "") == v)
    return lambda obj: all(check(obj) for check in checks)
