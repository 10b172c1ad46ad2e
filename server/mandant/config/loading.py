"""Reading a configuration: :func:`load_config` reads a YAML file and replaces
``${NAME}`` in its string values with environment variables (``$${`` is a literal
``${``), :func:`parse_config` validates data already read, and :func:`reloaded` is what
a reload (SIGHUP) keeps: the new configuration if it validates with its models, else
None, its errors logged."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mandant.config._base import _errors
from mandant.config.root import MandantConfig
from mandant.errors import ConfigError, shown

# The package's name, as before the split: log lines name the logger.
logger = logging.getLogger(__package__)

#: ``${NAME}`` (group 2) or the escape ``$${…}`` (group 1 set): a literal ``${…}``.
_ENV_REFERENCE = re.compile(r"\$(\$?)\{([^{}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_config(data: object, source: str = "configuration") -> MandantConfig:
    try:
        return MandantConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _errors(exc)) from None


def _expand_text(text: str, env: Mapping[str, str]) -> str:
    """``text`` with each ``${NAME}`` replaced by ``env[NAME]``; raises ValueError for an
    unset variable or a malformed reference. Values are inserted as they are (never
    expanded again) and never appear in an error message."""

    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "${" + name + "}"
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"'${{{name[:64]}}}' is not a variable reference (letters, digits, _)")
        if name not in env:
            raise ValueError(f"environment variable {name} is not set")
        return env[name]

    if "${" in _ENV_REFERENCE.sub("", text):
        raise ValueError("'${' without a closing '}' (write '$${' for a literal '${')")
    return _ENV_REFERENCE.sub(replace, text)


def _expand_env(
    data: object, env: Mapping[str, str], path: str, errors: list[tuple[str, str]]
) -> object:
    """``data`` with ``${NAME}`` expanded in every string value (not in mapping keys);
    problems are appended to ``errors`` with their field path."""
    if isinstance(data, str):
        try:
            return _expand_text(data, env)
        except ValueError as exc:
            errors.append((path or "(top level)", str(exc)))
            return data
    if isinstance(data, dict):
        return {
            key: _expand_env(value, env, f"{path}.{key}" if path else str(key), errors)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [
            _expand_env(item, env, f"{path}.{index}" if path else str(index), errors)
            for index, item in enumerate(data)
        ]
    return data


def config_folder(path: Path) -> Path:
    """The folder a configuration file's relative paths resolve against: the real
    file's, its symlinks resolved now, at each read. A mounted ConfigMap is symlinks
    into a folder the kubelet replaces at each edit (resolved once at start, every
    reload after an edit read a removed folder); a file linked into another folder
    keeps its models beside it."""
    return path.resolve().parent


def reloaded(load: Callable[[], MandantConfig], base_dir: Path) -> MandantConfig | None:
    """What ``load`` reads, if it validates with its models under ``base_dir``; else
    None, its errors logged: a reload keeps the configuration it runs."""
    try:
        config = load()
        config.model_specs(base_dir)
    except ConfigError as exc:
        logger.error("configuration reload refused, keeping the running one: %s", exc)
        return None
    return config


class _UniqueKeys(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an
    error: PyYAML keeps the last, so a second ``tenants:`` (or a tenant's second
    ``rate_limit:``) dropped the first without a word, and the file checked "ok"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: keys it brings may be given again, overriding
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # not hashable: the constructor says so below
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {shown(str(key))!r} given twice in one mapping (first at line "
                    f"{first.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without the file's text: PyYAML quotes the line, which
    may hold a secret (a Redis URL's password), and it went to the log on a reload."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not take
        character = exc.character
        code = ord(character) if isinstance(character, str) else character
        return f"{exc.reason} (#x{code:04x} at offset {exc.position})"
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = "; ".join(part for part in (exc.context, exc.problem) if part)
    return where + (what or "not valid YAML")


def load_config(path: Path, env: Mapping[str, str] | None = None) -> MandantConfig:
    """Read, expand ``${NAME}`` from ``env`` (default: the process environment) and
    validate the file at ``path``; a reference to an unset variable is an error."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), _UniqueKeys)  # noqa: S506: safe
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", exc.strerror or str(exc))]) from None
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        raise ConfigError(str(path), [("(file)", problem)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("(yaml)", _yaml_problem(exc))]) from None
    errors: list[tuple[str, str]] = []
    data = _expand_env(data, os.environ if env is None else env, "", errors)
    if errors:
        raise ConfigError(str(path), errors)
    return parse_config(data if data is not None else {}, str(path))
