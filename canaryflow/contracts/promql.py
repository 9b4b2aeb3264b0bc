"""PromQL gate templates: placeholders checked when a policy loads, values escaped when rendered.

A template names what it measures with `{{service}}`, `{{version}}`, `{{role}}` and `{{window}}`
(Flagger's MetricTemplate style; spaces inside the braces are allowed). The first three are
label values a release supplies, so they must sit inside a double-quoted PromQL string: there
they are escaped as string characters (and, after `=~` or `!~`, as regex literals too), so no
service or version name can end the string and add to the query. `{{window}}` is the window's
length in whole seconds, e.g. `60s`, for range selectors.
"""

from __future__ import annotations

import re

LABEL_PLACEHOLDERS = frozenset({"service", "version", "role"})
PLACEHOLDERS = LABEL_PLACEHOLDERS | {"window"}
MAX_QUERY_CHARS = 4000
MAX_VALUE_CHARS = 256  # a service, version or role longer than this is refused, not truncated
PROMQL_PREFIX = "promql:"  # gate names in verdicts: never confused with the built-in gates
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def _string_spans(template: str) -> list[tuple[int, int, bool]]:
    """(start, end, is_regex) of each double-quoted string; end is the closing quote's index.

    Single-quoted and backtick strings are skipped whole: a placeholder there is refused.
    """
    spans: list[tuple[int, int, bool]] = []
    i, n = 0, len(template)
    while i < n:
        quote = template[i]
        if quote not in "\"'`":
            i += 1
            continue
        j = i + 1
        while j < n and template[j] != quote:
            j += 2 if template[j] == "\\" and quote != "`" else 1
        if quote == '"':
            before = template[:i].rstrip()
            spans.append((i, j, before.endswith(("=~", "!~"))))
        else:
            spans.append((i, j, False))
        i = j + 1
    return spans


def _where(template: str, at: int) -> tuple[str, bool] | None:
    """The kind of string around offset `at`: ('"', is_regex), ("'"/"`", False) or None."""
    for start, end, regex in _string_spans(template):
        if start < at < end:
            return template[start], regex
    return None


def template_names(template: str) -> set[str]:
    """The placeholders a template uses, e.g. {"service", "window"}."""
    return {m.group(1) for m in _PLACEHOLDER.finditer(template)}


def placeholder_errors(template: str) -> list[str]:
    """Everything wrong with a template's placeholders, as sentences; empty when it is valid."""
    errors = []
    for match in _PLACEHOLDER.finditer(template):
        name = match.group(1)
        if name not in PLACEHOLDERS:
            known = ", ".join(f"{{{{{p}}}}}" for p in sorted(PLACEHOLDERS))
            errors.append(f"unknown placeholder {match.group(0)!r} (known: {known})")
            continue
        where = _where(template, match.start())
        if name in LABEL_PLACEHOLDERS and (where is None or where[0] != '"'):
            errors.append(
                f"{{{{{name}}}}} must sit inside a double-quoted label value, e.g. "
                f'{name}="{{{{{name}}}}}", where it can be escaped'
            )
        if name == "window" and where is not None:
            errors.append("{{window}} is a duration (e.g. [{{window}}]), not inside a string")
    leftover = _PLACEHOLDER.sub("", template)
    if "{{" in leftover:
        errors.append("an opening '{{' without its closing '}}'")
    return errors


def escape_string(value: str) -> str:
    """`value` as the inside of a double-quoted PromQL string (Go escapes)."""
    out = []
    for char in value:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def escape_regex(value: str) -> str:
    """`value` as a literal in an RE2 regex (then escaped as a string by the caller)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in value)


def render(template: str, values: dict[str, str], window_s: float) -> str:
    """The query for one version and role: label values escaped, the window as `<n>s`."""
    for name, value in values.items():
        if len(value) > MAX_VALUE_CHARS:
            raise ValueError(f"{name} is longer than {MAX_VALUE_CHARS} characters")
    window = f"{max(1, round(window_s))}s"
    spans = _string_spans(template)

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "window":
            return window
        if name not in values:
            raise ValueError(f"no value for {{{{{name}}}}}")
        regex = next((r for s, e, r in spans if s < match.start() < e), False)
        value = escape_regex(values[name]) if regex else values[name]
        return escape_string(value)

    return _PLACEHOLDER.sub(substitute, template)
