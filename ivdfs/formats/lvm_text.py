"""LVM's metadata text (libdm-config syntax): name = value, name { ... }, # comments; values are
"strings", integers, floats or [ flat, lists ].

Role: `parse_config` turns the committed metadata of a volume group (as `ivdfs.formats.lvm_disk`
reads it from a metadata area) into nested dicts. Pure.

Hostile input: the text comes from an untrusted disk. The parser has no recursion beyond
`MAX_DEPTH` and no integer longer than Python's own digit limit; anything else is a
`ConfigError` whose message says where.

Concurrency contract: no shared state; any thread.
"""

from __future__ import annotations

import re

__all__ = ["MAX_DEPTH", "ConfigError", "ConfigValue", "parse_config"]

# VG { logical_volumes { lv { segment { } } } } is four deep; anything much deeper is hostile.
MAX_DEPTH = 32

ConfigValue = str | int | float | list["ConfigValue"] | dict[str, "ConfigValue"]


class ConfigError(ValueError):
    """The text is not LVM configuration syntax; the message says where."""


_TOKEN = re.compile(
    r"""(?:\s+|\#[^\n]*)*(?:
        (?P<punct>[{}\[\],=])
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | '(?P<sq>(?:[^'\\]|\\.)*)'
      | (?P<word>[^\s{}\[\],=\#"']+)
      | (?P<end>\Z)
    )""",
    re.X | re.S,
)
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)")
_ESCAPE = re.compile(r"\\(.)", re.S)


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def next(self) -> tuple[str, str]:
        """(kind, text): kind is "punct", "string", "word" or "end"."""
        m = _TOKEN.match(self.text, self.pos)
        if m is None:
            raise ConfigError(f"unexpected character at offset {self.pos}")
        self.pos = m.end()
        if m["punct"] is not None:
            return "punct", m["punct"]
        if m["dq"] is not None:
            return "string", _ESCAPE.sub(r"\1", m["dq"])
        if m["sq"] is not None:
            return "string", _ESCAPE.sub(r"\1", m["sq"])
        if m["word"] is not None:
            return "word", m["word"]
        return "end", ""


def parse_config(text: str) -> dict[str, ConfigValue]:
    """Parse LVM configuration text; ConfigError for anything that is not its syntax.

    A repeated name keeps its first value (libdm's lookups find the first node too).
    """
    lex = _Lexer(text)
    return _parse_block(lex, depth=0)


def _parse_block(lex: _Lexer, depth: int) -> dict[str, ConfigValue]:
    if depth > MAX_DEPTH:
        raise ConfigError(f"sections nested deeper than {MAX_DEPTH}")
    out: dict[str, ConfigValue] = {}
    while True:
        kind, tok = lex.next()
        if kind == "end":
            if depth:
                raise ConfigError("unterminated section at the end of the text")
            return out
        if (kind, tok) == ("punct", "}"):
            if not depth:
                raise ConfigError(f"unbalanced '}}' at offset {lex.pos}")
            return out
        if kind != "word":
            raise ConfigError(f"expected a name at offset {lex.pos}, found {tok!r:.40}")
        name = tok
        kind, tok = lex.next()
        value: ConfigValue
        if (kind, tok) == ("punct", "{"):
            value = _parse_block(lex, depth + 1)
        elif (kind, tok) == ("punct", "="):
            value = _parse_value(lex)
        else:
            raise ConfigError(f"expected '=' or '{{' after {name!r:.40} at offset {lex.pos}")
        out.setdefault(name, value)


def _parse_value(lex: _Lexer) -> ConfigValue:
    kind, tok = lex.next()
    if (kind, tok) == ("punct", "["):
        items: list[ConfigValue] = []
        kind, tok = lex.next()
        if (kind, tok) == ("punct", "]"):
            return items
        while True:
            items.append(_scalar(kind, tok, lex))
            kind, tok = lex.next()
            if (kind, tok) == ("punct", "]"):
                return items
            if (kind, tok) != ("punct", ","):
                raise ConfigError(f"expected ',' or ']' at offset {lex.pos}")
            kind, tok = lex.next()
    return _scalar(kind, tok, lex)


def _scalar(kind: str, tok: str, lex: _Lexer) -> ConfigValue:
    if kind == "string":
        return tok
    if kind == "word":
        try:
            if _INT.fullmatch(tok):
                return int(tok)
            if _FLOAT.fullmatch(tok):
                return float(tok)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise ConfigError(f"number too long at offset {lex.pos}") from None
    raise ConfigError(f"expected a value at offset {lex.pos}, found {tok!r:.40}")
