"""Argument checks for the public constructors: every message names the argument and the value it got.

A value of the wrong type raises TypeError (``Grafting: a must be a number, got '0.4'.``); a value of the right
type outside its range raises ValueError. Each check returns the value in its plain Python type.
"""

import math
import numbers
import os


def shown(value):
    """How a message shows the value it got: repr of short values, the type of long or opaque ones."""
    text = repr(value)
    if len(text) > 80:
        return f"a {type(value).__name__}"
    return text


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number(owner, name, value, minimum=None, maximum=None, open_minimum=False, open_maximum=False, finite=True,
           allow_none=False):
    """A real number (not a bool) in the given range, as a float; NaN is always refused."""
    if value is None and allow_none:
        return None
    if not _is_number(value):
        raise TypeError(f"{owner}: {name} must be a number, got {shown(value)}.")
    original, value = value, float(value)
    bad = math.isnan(value) or (finite and math.isinf(value))
    bad |= minimum is not None and (value < minimum or (open_minimum and value == minimum))
    bad |= maximum is not None and (value > maximum or (open_maximum and value == maximum))
    if bad:
        raise ValueError(f"{owner}: {name} must be {_range(minimum, maximum, open_minimum, open_maximum, finite)}, "
                         f"got {shown(original)}.")
    return value


def _range(minimum, maximum, open_minimum, open_maximum, finite):
    if minimum is not None and maximum is not None:
        return (f"a number in {'(' if open_minimum else '['}{minimum:g}, {maximum:g}{')' if open_maximum else ']'}")
    text = "a finite number" if finite else "a number"
    if minimum is not None:
        text += f" {'>' if open_minimum else '>='} {minimum:g}"
    if maximum is not None:
        text += f" {'<' if open_maximum else '<='} {maximum:g}"
    return text


def integer(owner, name, value, minimum=None, allow_none=False):
    """An integer (an integral float such as 2.0 is accepted; a bool is not) >= ``minimum``, as an int."""
    if value is None and allow_none:
        return None
    if not _is_number(value) and not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an integer, got {shown(value)}.")
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not math.isfinite(value) or int(value) != value or (
            minimum is not None and value < minimum):
        raise ValueError(f"{owner}: {name} must be an integer{bound}, got {shown(value)}.")
    return int(value)


def boolean(owner, name, value):
    """True or False (NumPy bools too), as a bool."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{owner}: {name} must be True or False, got {shown(value)}.")
    return bool(value)


def verbose(owner, value):
    """0 or 1 (or a bool), as an int."""
    if isinstance(value, bool) or (_is_number(value) and value in (0, 1)):
        return int(value)
    if not _is_number(value):
        raise TypeError(f"{owner}: verbose must be 0 or 1, got {shown(value)}.")
    raise ValueError(f"{owner}: verbose must be 0 or 1, got {shown(value)}.")


def choice(owner, name, value, choices):
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {shown(value)}.")
    return value


def path(owner, name, value):
    """A non-empty str or os.PathLike, as a str."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{owner}: {name} must be a path (a str or os.PathLike), got {shown(value)}.")
    value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{owner}: {name} must be a non-empty path, got {shown(value)}.")
    return value


def layer_selection(owner, value):
    """``layers``: None, a layer name, a list of names, or a callable ``layer -> bool``."""
    if value is None or callable(value) or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{owner}: layers must name at least one layer (None grafts every layer), got "
                             f"{shown(value)}.")
        return list(value)
    raise TypeError(f"{owner}: layers must be None, a layer name, a list of layer names or a callable "
                    f"layer -> bool, got {shown(value)}.")
