"""Per-layer ranks and alphas: PEFT's `rank_pattern` / `alpha_pattern` rule, once.

A pattern is a dict `{regular expression: value}`. A layer takes the value of
the first key (in dict order) that matches its whole name or a whole suffix of
it that starts after a separator (PEFT's `get_pattern_key`:
`re.match(rf"(.*\\.)?({key})$", name)`); layers no key matches keep the
default. PEFT module names are separated by `"."`, Keras layer paths by
`"/"`: `enable_lora` and `load_peft_adapter` both call `pattern_value`, with
their own separator.
"""

import re
import time

from keras_lora.layers import lora_math

# Total matching time allowed for the patterns of one untrusted file (the
# regex package overshoots its timeouts: about 3x measured).
UNTRUSTED_SECONDS = 0.25


def pattern_regex(key, separator="."):
    """The regular expression PEFT builds from a pattern key."""
    return rf"(.*{re.escape(separator)})?({key})$"


def pattern_value(pattern, name, default, separator=".", matcher=re.match):
    """The value of the first key of `pattern` matching `name`, else `default`.

    Args:
        pattern: dict `{regular expression: value}` (None or empty: no keys).
        name: the module name (PEFT) or layer path (Keras).
        default: the value when no key matches.
        separator: what separates the name's components (`"."` or `"/"`).
        matcher: `re.match`, or a `BoundedMatcher` for patterns and names
            that come from a file.

    Example:

    >>> pattern_value({"query": 16}, "gpt2/layer_0/attention/query", 8, "/")
    16
    """
    for key in pattern or {}:
        if matcher(pattern_regex(key, separator), name):
            return pattern[key]
    return default


class BoundedMatcher:
    """`re.match` for regular expressions and names from an untrusted file,
    with a total time budget.

    A backtracking matcher takes exponential time on keys such as
    `(a|aa)+b` against a name of 60 `a`s, and a file supplies both. The
    `regex` package (a dependency of the `interop` extra, and of KerasHub)
    matches with a timeout, which is spent from one budget per file: past it,
    a `ValueError` names the file.

    Args:
        source: the file, for the message.
        seconds: the total matching time allowed.
    """

    def __init__(self, source, seconds=UNTRUSTED_SECONDS):
        import regex

        self.regex = regex
        self.source = source
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def __call__(self, expression, name):
        left = max(self.deadline - time.monotonic(), 1e-3)
        try:
            return self.regex.match(expression, name, timeout=left)
        except TimeoutError:
            raise ValueError(
                f"'{self.source}': matching its regular expressions against "
                f"its module names took over {self.seconds} s (a pattern with "
                "nested repetition, such as '(a|aa)+b'?). Received: "
                f"pattern={expression[:80]!r}, name={name[:80]!r}"
            ) from None


def check_patterns(rank_pattern, alpha_pattern):
    """Validates `enable_lora`'s `rank_pattern` and `alpha_pattern` arguments.

    Raises:
        ValueError: naming the argument, for anything but a dict of valid
            regular expressions to positive ints (ranks) or numbers (alphas).
    """
    for argument, pattern in (
        ("rank_pattern", rank_pattern),
        ("alpha_pattern", alpha_pattern),
    ):
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise ValueError(
                f"`{argument}` must be a dict {{regular expression: value}} or "
                f"None. Received: {argument}={pattern!r}"
            )
        for key, value in pattern.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"`{argument}` keys must be strings (regular expressions). "
                    f"Received: {argument}={pattern!r}"
                )
            try:
                re.compile(pattern_regex(key, "/"))
            except re.error as error:
                raise ValueError(
                    f"`{argument}` key {key!r} is not a valid regular expression "
                    f"({error}). Received: {argument}={pattern!r}"
                ) from None
            try:
                if argument == "rank_pattern":
                    lora_math.check_rank(value)
                else:
                    lora_math.check_alpha(value, 1)
            except ValueError as error:
                raise ValueError(
                    f"`{argument}[{key!r}]` is invalid: {error} "
                    f"Received: {argument}={pattern!r}"
                ) from None


def check_all_used(pattern, argument, paths):
    """Raises if a key of `pattern` gives no adapted layer its value: it
    matches none of their paths (a typo), or an earlier key matches every
    layer it matches (the first matching key wins); either would leave
    layers at another value, silently."""
    used = {_first_key(pattern, path) for path in paths}
    for key in pattern or {}:
        if key in used:
            continue
        shadowed = [p for p in paths if re.match(pattern_regex(key, "/"), p)]
        problem = (
            f"matches only layers that an earlier key already gives a value "
            f"(the first matching key wins: '{shadowed[0]}' takes "
            f"{_first_key(pattern, shadowed[0])!r})"
            if shadowed
            else "matches none of the adapted layers (keys match a layer's path "
            "in full, or its last components after a '/')"
        )
        raise ValueError(
            f"`{argument}` key {key!r} {problem}. Adapted layers: "
            f"{sorted(paths)[:12]}. Received: {argument}={pattern!r}"
        )


def _first_key(pattern, path):
    """The key of `pattern` that gives `path` its value (None: no key)."""
    return next(
        (k for k in pattern or {} if re.match(pattern_regex(k, "/"), path)), None
    )
