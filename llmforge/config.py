"""One config system: pydantic models, YAML recipes, dotted ``--set`` overrides, flags from fields.

Every stage's config (corpus spec, model, train, evaluate, finetune, export) is a :class:`Config`:
a pydantic model that forbids unknown keys, so a typo is an error that names the file and the
field. A field is written once, with its default and its help text; the command line derives its
flags from the fields (:func:`add_flags`), and ``--set a.b=value`` (:func:`parse_sets`) reaches
any field by its dotted path, the same in every command.

A field that only says how a run is watched or where it runs, never what it computes (the
device, logging intervals, ``compile``), is declared with :func:`control`; :func:`key_fields`
leaves those out, so a stage's key (its output directory's fingerprint) does not change when a
user adds ``--compile`` to resume a run.

Precedence, lowest first: the field's default, a recipe file (``--config FILE``), flags,
``--set``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping, TypeVar, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from llmforge.errors import ConfigError, NotFound, suggest

C = TypeVar("C", bound="Config")

_CONTROL = "llmforge_control"
_LATER = "llmforge_in_key_when_set"


class Config(BaseModel):
    """Base of every typed config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def load(cls: type[C], data: Mapping[str, Any] | None, source: str = "config") -> C:
        """Validate ``data``; a problem is a :class:`ConfigError` naming ``source`` and the field."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as e:
            raise ConfigError(describe_validation_error(e, cls, source)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def key_dict(self) -> dict[str, Any]:
        """The fields that change what the stage computes (control fields left out)."""
        return key_fields(self)


def control(default: Any = None, description: str = "", **kw: Any) -> Any:
    """A field that does not change a stage's output (device, logging, compile): not in its key."""
    extra = dict(kw.pop("json_schema_extra", None) or {})
    extra[_CONTROL] = True
    return Field(default, description=description, json_schema_extra=extra, **kw)


def added_later(default: Any = None, description: str = "", **kw: Any) -> Any:
    """A field added after runs were keyed: it enters a stage's key only when it differs from its
    default, so the runs made before it existed keep their keys (and resume)."""
    extra = dict(kw.pop("json_schema_extra", None) or {})
    extra[_LATER] = True
    return Field(default, description=description, json_schema_extra=extra, **kw)


def _extra(model: type[BaseModel], name: str, flag: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(flag))


def is_control(model: type[BaseModel], name: str) -> bool:
    return _extra(model, name, _CONTROL)


def key_fields(cfg: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = type(cfg)
    for name, field in model.model_fields.items():
        if is_control(model, name):
            continue
        value = getattr(cfg, name)
        if _extra(model, name, _LATER) and value == field.default:
            continue
        out[name] = key_fields(value) if isinstance(value, BaseModel) else _jsonable(value)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


# ---------------------------------------------------------------------------------------------
# parsed scalar types


_UNITS_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_UNITS_N = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_duration(v: Any) -> Any:
    """``600``, ``"600"``, ``"10m"``, ``"1h30m"``, ``"90s"``, ``"1.5h"`` -> seconds (float)."""
    import re

    if v is None or isinstance(v, (int, float)):
        return v
    text = str(v).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", text)
    if not parts or "".join(a + b for a, b in parts) != text or any(u not in _UNITS_S for _, u in parts):
        raise ValueError(f"not a duration: {v!r} (use seconds, or e.g. 90s, 10m, 1h30m)")
    return float(sum(float(a) * _UNITS_S[u] for a, u in parts))


def parse_count(v: Any) -> Any:
    """``200000000``, ``"200M"``, ``"1.5B"``, ``"500k"`` -> an int."""
    import re

    if v is None or isinstance(v, int):
        return v
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmbgt]?)", str(v).strip().lower().replace("_", "").replace(",", ""))
    if not m:
        raise ValueError(f"not a count: {v!r} (use e.g. 2000000, 200M, 1.5B)")
    return int(float(m.group(1)) * _UNITS_N[m.group(2)])


Duration = Annotated[float, BeforeValidator(parse_duration)]
Count = Annotated[int, BeforeValidator(parse_count)]


# ---------------------------------------------------------------------------------------------
# errors


def describe_validation_error(e: ValidationError, model: type[BaseModel] | None, source: str) -> str:
    """One line: ``source: field.path: problem`` for the first error (and how many more)."""
    errors = e.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        known = _known_at(model, first["loc"][:-1])
        msg = f"{source}: unknown key {loc}"
        if known:
            msg += "; " + suggest(str(first["loc"][-1]), known)
    else:
        got = first.get("input")
        got_s = "" if isinstance(got, (dict, list)) or first["type"] == "value_error" else f" (got {got!r})"
        problem = first["msg"].removeprefix("Value error, ")
        msg = f"{source}: {problem}" if not first["loc"] else f"{source}: {loc}: {problem}{got_s}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return msg


def _known_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names of the (nested) model at ``loc``."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        model = _submodel(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        sub = _submodel(arg)
        if sub is not None:
            return sub
    return None


# ---------------------------------------------------------------------------------------------
# YAML files and overrides


def read_yaml(path: str | Path, what: str = "a config file") -> dict[str, Any]:
    """A YAML file holding a mapping; errors name the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise NotFound(f"{p}: {what} not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (expected YAML)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: {what} must be a mapping of keys to values, got a {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` (nested mappings merged, everything else replaced)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML would read it: ``3e-4`` -> 0.0003, ``true``, ``[1, 2]``, ``null``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and text.strip() != text:
        return text
    # YAML 1.1 reads "3e-4" as a string; people mean a number
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def parse_sets(items: Iterable[str], option: str = "--set") -> dict[str, Any]:
    """``["train.lr=3e-4", "model.n_layer=2"]`` -> ``{"train": {"lr": 0.0003}, "model": {"n_layer": 2}}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE with a dotted key, e.g. {option} train.lr=3e-4")
        out = deep_merge(out, nest(key, parse_value(value)))
    return out


def flatten_dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the inverse of :func:`nest` merged over keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def nest(dotted: str, value: Any) -> dict[str, Any]:
    parts = dotted.split(".")
    d: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        d = {p: d}
    return d


# ---------------------------------------------------------------------------------------------
# command-line flags from fields

_SCALARS = (int, float, str, bool)


def _scalar_type(annotation: Any) -> type | None:
    """int/float/str/bool for a field annotation (``X | None`` too), else None (not a flag)."""
    if annotation in _SCALARS:
        return annotation
    origin = get_origin(annotation)
    if origin in (list, tuple, dict, set):
        return None
    if origin is Annotated:  # a parsed type (a duration, a count): the flag passes the text through
        return str
    if origin is not None and str(origin) in ("typing.Literal",):
        return str
    args = [a for a in get_args(annotation) if a is not type(None)]
    if len(args) == 1:
        return _scalar_type(args[0])
    if args and all(get_origin(a) is not None and str(get_origin(a)) == "typing.Literal" for a in args):
        return str
    if str(origin) == "typing.Literal":
        return str
    return None


def _choices(annotation: Any) -> list[Any] | None:
    if str(get_origin(annotation)) == "typing.Literal":
        return list(get_args(annotation))
    for a in get_args(annotation):
        if str(get_origin(a)) == "typing.Literal":
            return list(get_args(a))
    return None


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], section: str | None,
              *, only: Iterable[str] | None = None, skip: Iterable[str] = (), title: str | None = None) -> None:
    """One ``--field-name`` flag per scalar field of ``model``; its value lands at
    ``section.field`` (see :func:`flag_overrides`). Help text and default come from the field."""
    group = parser.add_argument_group(title or (f"{section} options (also --set {section}.NAME=VALUE)"
                                                if section else "options"))
    wanted = list(only) if only is not None else list(model.model_fields)
    for name in wanted:
        if name in skip:
            continue
        f = model.model_fields[name]
        typ = _scalar_type(f.annotation)
        if typ is None:
            continue
        dest = f"cfg:{section}.{name}" if section else f"cfg:{name}"
        flag = "--" + name.replace("_", "-")
        default = f.get_default(call_default_factory=True)
        help_text = (f.description or "").rstrip(".")
        shown = "none" if default is None else default
        if "default:" not in help_text:
            help_text = f"{help_text} (default: {shown})" if help_text else f"(default: {shown})"
        if typ is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            choices = _choices(f.annotation)
            metavar = None if choices else {int: "N", float: "X"}.get(typ, "TEXT")
            group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=metavar,
                               choices=choices, type=_flag_type(typ, flag), help=help_text)


def _flag_type(typ: type, flag: str):
    if typ is str:
        return str

    def convert(text: str) -> Any:
        if text.lower() in ("none", "null"):
            return None
        v = parse_value(text)
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise argparse.ArgumentTypeError(f"expected {'a number' if typ is float else 'an integer'}, got {text!r}")
        return v

    convert.__name__ = typ.__name__
    return convert


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config values the user gave as flags, nested by their sections."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith("cfg:"):
            out = deep_merge(out, nest(dest[4:], value))
    return out
