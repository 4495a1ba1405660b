"""A task's aggregator expression: a preset with TFF's name, or a composition.

    compression_aggregator()
    dp_aggregator(noise_multiplier=1.0, clients_per_round=10)
    zeroing(norm=5, clipping(mean(uniform(bits=4, rotation=true))))

Grammar: call := NAME [ "(" [arg ("," arg)*] ")" ];  arg := NAME "=" value | call;
value := number | true | false | inf. A call takes at most one inner call (the inner stage).
"""

from __future__ import annotations

import dataclasses
import math
import re

_TOKEN = re.compile(
    r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(.))"
)

Value = float | bool


class ExpressionError(ValueError):
    """The aggregator expression is malformed; the message says where."""


@dataclasses.dataclass
class Call:
    name: str
    args: dict[str, Value]
    inner: Call | None

    def take(self, key: str, default: Value | None = None) -> Value | None:
        return self.args.pop(key, default)

    def number(self, key: str, default: float | None = None) -> float | None:
        value = self.args.pop(key, default)
        if isinstance(value, bool):
            raise ExpressionError(f"{self.name}: {key} must be a number, got {value}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.args.pop(key, default)
        if not isinstance(value, bool):
            raise ExpressionError(f"{self.name}: {key} must be true or false, got {value}")
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.number(key, default)
        assert value is not None
        if not math.isfinite(value) or value != int(value):
            raise ExpressionError(f"{self.name}: {key} must be an integer, got {value}")
        return int(value)

    def done(self) -> None:
        if self.args:
            raise ExpressionError(f"{self.name}: unknown argument(s) {sorted(self.args)}")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        assert match is not None
        token = match.group(match.lastindex or 0)
        if match.lastindex == 3 and token not in "(),=":
            raise ExpressionError(f"unexpected character {token!r} at {position}")
        out.append(token)
        position = match.end()
    return out


def parse_call(text: str) -> Call:
    """Parses an expression. Raises ExpressionError."""
    tokens = _tokens(text)
    if not tokens:
        raise ExpressionError("empty aggregator expression")
    call, rest = _call(tokens)
    if rest:
        raise ExpressionError(f"unexpected {' '.join(rest)!r} after the expression")
    return call


def _value(token: str) -> Value:
    lowered = token.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "inf":
        return math.inf
    try:
        return float(token)
    except ValueError:
        raise ExpressionError(f"expected a number, true, false or inf, got {token!r}") from None


def _call(tokens: list[str]) -> tuple[Call, list[str]]:
    name, rest = tokens[0], tokens[1:]
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ExpressionError(f"expected a name, got {name!r}")
    call = Call(name, {}, None)
    if not rest or rest[0] != "(":
        return call, rest
    rest = rest[1:]
    while rest and rest[0] != ")":
        if len(rest) >= 3 and rest[1] == "=":
            if rest[0] in call.args:
                raise ExpressionError(f"{name}: argument {rest[0]!r} given twice")
            call.args[rest[0]] = _value(rest[2])
            rest = rest[3:]
        else:
            if call.inner is not None:
                raise ExpressionError(f"{name}: takes at most one inner aggregator")
            call.inner, rest = _call(rest)
        if rest and rest[0] == ",":
            rest = rest[1:]
        elif rest and rest[0] != ")":
            raise ExpressionError(f"{name}: expected ',' or ')', got {rest[0]!r}")
    if not rest:
        raise ExpressionError(f"{name}: missing ')'")
    return call, rest[1:]
