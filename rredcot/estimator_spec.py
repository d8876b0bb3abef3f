"""The credit.estimators mini-language: "rredcot" or a variant "rredcot:self_normalize=true,mode=anchored".

A variant is an estimator name and options over its shipped config, written in one list item so that
`rredcot credit` can score several settings of one estimator side by side. Parsing only: whether the
name and its options are valid is rredcot/checks.py (through the registry).
"""

from __future__ import annotations

from typing import Any

from rredcot.errors import UserError


def estimator_spec(entry: str) -> tuple[str, dict[str, Any]]:
    """A credit.estimators entry: "rredcot" or a variant "rredcot:self_normalize=true,include_reference=false"
    -> (name, options over its shipped config). Values are YAML: true, 0.5, [a, b], [["so x=", "\\n"]]
    (commas inside brackets or quotes belong to the value)."""
    import yaml

    name, _, rest = str(entry).partition(":")
    opts = {}
    for part in _top_level_split(rest):
        key, eq, value = part.partition("=")
        if not eq:
            raise UserError(
                f"credit.estimators entry {entry!r}: write options as name:key=value,key=value "
                "(e.g. rredcot:self_normalize=true)."
            )
        try:
            opts[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(
                f"credit.estimators entry {entry!r}: the value of {key.strip()} is not valid YAML "
                f"({str(e).splitlines()[0]}). Quote strings, e.g. extra_forcings=[['so x=', '\\n']]."
            ) from None
    return name.strip(), opts


def _top_level_split(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: 'a=1,b=[1,2],c="x,y"' -> ['a=1', 'b=[1,2]', 'c="x,y"']."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return [p for p in [*parts, cur] if p.strip()]
