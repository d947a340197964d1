"""Config values checked against what the code declares: the keys a class or settings dataclass
accepts and the simple types its annotations name (``int``, ``float``, ``bool``, ``str``, ``None``).

A typo or a value of the wrong type fails here in one line that names the key, instead of being
ignored or failing deep inside the model (``model.num_latent_scales=abc`` used to end in
``TypeError: unsupported operand type(s) for +: 'int' and 'str'``)."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import fields

from fusionvae.errors import BadInputError

_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
_LISTED = 16  # known keys named in the error, up to this many
HYDRA_KEYS = ("_target_", "_convert_", "_partial_", "_recursive_", "_args_")


def settings_from_dict(cls, values: dict | None, key: str):
    """``cls(**values)`` for a settings dataclass, refusing keys it does not have (a typo must not
    be ignored) and values of another type than its annotations name."""
    declared = {f.name: f.type for f in fields(cls)}
    refuse_unknown(values or {}, declared, key)
    for name, value in (values or {}).items():
        check_type(f"{key}.{name}", value, declared[name], getattr(cls, name, None))
    return cls(**(values or {}))


def refuse_unknown(values: dict, known, key: str) -> None:
    """One line naming every key of ``values`` not in ``known``, with the closest known spelling."""
    unknown = sorted(set(values) - set(known) - set(HYDRA_KEYS))
    if not unknown:
        return
    hints = [f"{key}.{u}" + _closest(u, known) for u in unknown]
    listed = f"known: {', '.join(sorted(known))}" if len(known) <= _LISTED else "check the spelling"
    raise BadInputError(f"unknown setting(s) {', '.join(hints)}; {listed}")


def _closest(name: str, known) -> str:
    match = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def check_type(key: str, value, annotation, default=None) -> None:
    """Refuse ``value`` unless it is one of the simple types ``annotation`` names (a string such as
    ``"int | None"``, as ``from __future__ import annotations`` leaves it); an annotation naming
    anything else (lists, dicts, unions of classes) is not checked. A float setting takes an int."""
    types = _simple_types(annotation)
    if types is None or _matches(value, types):
        return
    wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
    shown = f" (the default is {key}={default})" if default is not None else ""
    raise BadInputError(f"{key} must be {_article(wanted)} {wanted}, got {value!r}{shown}")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _simple_types(annotation) -> tuple[type, ...] | None:
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", None)
    if not annotation:
        return None
    parts = [p.strip() for p in annotation.replace("Optional[", "None | ").rstrip("]").split("|")]
    if not all(p in _SIMPLE for p in parts):
        return None
    return tuple(_SIMPLE[p] for p in parts)


def _matches(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def declared_arguments(cls) -> dict[str, inspect.Parameter] | None:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the base classes (a
    datamodule passing its loader settings to its base), or into the class named by a
    ``kwargs_go_to`` attribute (the LightningModule's network settings); None when a ``**kwargs``
    leads nowhere that says what it takes (then any key is accepted)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in inspect.getmro(cls):
        if klass is object or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        found.update({p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)})
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
        target = vars(klass).get("kwargs_go_to")
        if target is not None:
            more = declared_arguments(target)
            return None if more is None else {**found, **more}
    else:
        return None
    found.pop("self", None)
    return found


def check_arguments(cls, values: dict, key: str) -> None:
    """Refuse keys ``cls`` does not accept and values of another simple type than it declares."""
    declared = declared_arguments(cls)
    if declared is None:
        return
    refuse_unknown(values, declared, key)
    for name, value in values.items():
        if name in declared:
            # no default named: the class's may not be the config's (model/size presets)
            check_type(f"{key}.{name}", value, declared[name].annotation)
