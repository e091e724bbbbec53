"""Typed job configs and the one command-line convention every job follows.

Configs. Each job (and each shared training component) owns a ``@dataclass(kw_only=True)``
config; YAML files map onto it. ``load_config(Config, "file.yaml", overrides=["optim.lr=1e-3"])``
builds nested dataclasses, checks the types of scalars and rejects unknown keys with the list of
valid ones, so a typo in a config fails at start (one line naming the file and the key), not after
an hour of training.

Command line. Every job runs as::

    slidestream JOB [--config FILE] [--out DIR] [NAMED FLAGS] [KEY=VALUE ...]

where the named flags (:class:`Flag`) are spellings of the job's most common config keys. Values
are applied in this order, later ones winning: the config's defaults, ``--config FILE``, the named
flags, ``--out``, then ``KEY=VALUE`` overrides (dotted keys, values parsed as YAML:
``train.steps=50``, ``data.mpps=[0.5,1.0]``). :func:`add_job_arguments` builds that parser and
:func:`config_from_args` the config; both are used by every job, so ``--help`` reads the same
everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
import types
import typing
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")

#: the shipped YAML configs, ``pipelines/configs/<job>/*.yaml``: package data, so the demo's and
#: the benchmarks' defaults find them from an installed package (wheel, Docker image) too
SHIPPED_CONFIGS: Path = Path(str(files("pipelines") / "configs"))

#: ``key.sub=value`` on the command line (a key is a dotted identifier; a path or URL is not)
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")

CONVENTION = (
    "Settings are applied in order, later ones winning: the defaults, --config FILE, the named flags, "
    "--out, then KEY=VALUE overrides (dotted config keys, values in YAML: train.steps=50, "
    "data.mpps=[0.5,1.0]). An unknown key or a value of the wrong type stops the job at once."
)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def from_dict(cls: type[T], data: dict, where: str = "", base: T | None = None) -> T:
    """Build ``cls`` from a (nested) mapping; unknown keys and wrong types raise
    :class:`ConfigError` naming the dotted key (``where`` is the prefix of nested keys).

    Keys the mapping leaves out keep their defaults — also inside a nested section: a section
    given in part (``optim: {lr: 0.1}``) updates the section's default for *this* config (a job
    may default ``optim.lr_scaling`` to ``linear``) rather than the section class's own defaults.
    ``base`` is the instance to update (default: ``cls()``'s defaults)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"{where or 'top level'}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(fields)}"
        )
    kwargs = {}
    for k, v in data.items():
        key = f"{where}.{k}" if where else k
        tp = hints[k]
        if _is_dataclass_type(tp) and isinstance(v, dict):
            sub = getattr(base, k) if base is not None else _field_default(fields[k])
            kwargs[k] = from_dict(tp, v, key, base=sub if isinstance(sub, tp) else None)
        else:
            kwargs[k] = _coerce(tp, v, key)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        sub = d.get(k)
        if not isinstance(sub, dict):
            sub = d[k] = {}
        d = sub
    d[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` → ``("a.b", yaml value)``."""
    if not OVERRIDE.match(text):
        raise ConfigError(f"override {text!r} must look like key.sub=value (a dotted config key)")
    k, v = text.split("=", 1)
    try:
        return k.strip(), yaml.safe_load(v)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    values: dict[str, Any] | None = None,
) -> T:
    """Load a YAML file into ``cls``; then ``values`` (``{"a.b": value}``, typed, e.g. from named
    flags) and ``overrides`` (``a.b=value`` strings parsed as YAML) are applied on top, in that
    order. Errors are :class:`ConfigError` naming the file and the key."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}; check the --config path")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
        loaded = loaded or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level of a config must be a mapping of keys")
        data = loaded
    for k, v in (values or {}).items():
        _set_path(data, k, v)
    for ov in overrides or []:
        k, v = parse_override(ov)
        _set_path(data, k, v)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def write_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically (temporary name, then rename)."""
    from wsi.atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, dump_config(cfg))
    return path


# --- the command-line convention ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Flag:
    """A named flag that sets config ``key`` (``--name`` defaults to the key's last part with
    ``_`` → ``-``). ``action="store_true"`` sets the key to True, ``"store_false"`` to False;
    ``action="append"`` (repeatable flag) and ``nargs`` give a list."""

    key: str
    help: str
    name: str | None = None
    type: Any = None
    choices: Sequence[Any] | None = None
    nargs: str | None = None
    action: str | None = None
    metavar: str | None = None

    @property
    def option(self) -> str:
        return self.name or "--" + self.key.split(".")[-1].replace("_", "-")

    @property
    def dest(self) -> str:
        return "flag_" + self.key.replace(".", "__")


def add_job_arguments(
    parser: argparse.ArgumentParser,
    config_cls: type,
    flags: Sequence[Flag] = (),
    *,
    config_help: str = "YAML config file",
    out_help: str = "output directory (config key: out)",
    resume: bool = False,
) -> None:
    """Give ``parser`` the one convention: ``[--config FILE] [--out DIR] [flags] [KEY=VALUE ...]``
    (plus ``--resume`` for jobs that checkpoint). The epilog lists the config's top-level keys."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    keys = ", ".join(f.name for f in dataclasses.fields(config_cls) if f.init)
    parser.epilog = (
        textwrap.fill(CONVENTION, 90)
        + "\n\n"
        + textwrap.fill(f"config keys ({config_cls.__name__}): {keys}", 90)
    )
    conv = parser.add_argument_group("config (every job)")
    conv.add_argument("--config", metavar="FILE", default=None, help=config_help)
    conv.add_argument("--out", metavar="DIR", default=None, help=out_help)
    if resume:
        conv.add_argument(
            "--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists"
        )
    conv.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=50"
    )
    if flags:
        named = parser.add_argument_group("named flags (spellings of config keys)")
        for f in flags:
            kw: dict[str, Any] = {"dest": f.dest, "help": f"{f.help} (config key: {f.key})"}
            kw["default"] = None
            if f.action in ("store_true", "store_false"):
                kw["action"] = f.action
            else:
                if f.action is not None:
                    kw["action"] = f.action
                for name in ("type", "choices", "nargs", "metavar"):
                    if getattr(f, name) is not None:
                        kw[name] = getattr(f, name)
                if f.metavar is None and f.choices is None:
                    kw["metavar"] = f.key.split(".")[-1].upper()
            named.add_argument(f.option, **kw)


def config_from_args(
    config_cls: type[T],
    args: argparse.Namespace,
    flags: Sequence[Flag] = (),
    *,
    required: Sequence[str] = (),
) -> T:
    """The config of a job parsed by :func:`add_job_arguments`: the YAML file, then the flags
    that were given, ``--out``, then the ``KEY=VALUE`` overrides. ``required`` keys must end up
    set (non-empty); a missing one is a :class:`ConfigError` naming its flag and key."""
    overrides = list(getattr(args, "overrides", None) or [])
    values: dict[str, Any] = {}
    for f in flags:
        v = getattr(args, f.dest, None)
        if v is None:
            continue
        if isinstance(v, list):
            # `--slides a b key=value`: argparse gives greedy list flags the overrides after them
            overrides = [x for x in v if isinstance(x, str) and OVERRIDE.match(x)] + overrides
            v = [x for x in v if not (isinstance(x, str) and OVERRIDE.match(x))]
        if f.action == "store_true":
            v = True
        elif f.action == "store_false":
            v = False
        values[f.key] = v
    if getattr(args, "out", None) is not None:
        values["out"] = str(args.out)
    cfg = load_config(config_cls, getattr(args, "config", None), overrides, values)
    missing = []
    for key in required:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj in (None, "", [], ()):
            flag = next((f.option for f in flags if f.key == key), "--out" if key == "out" else None)
            missing.append(f"{flag} (config key {key})" if flag else f"config key {key}")
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; give it as a flag, in --config or as KEY=VALUE")
    return cfg


__all__ = [
    "CONVENTION",
    "ConfigError",
    "Flag",
    "add_job_arguments",
    "config_from_args",
    "dump_config",
    "from_dict",
    "load_config",
    "parse_override",
    "to_dict",
    "write_config",
]
