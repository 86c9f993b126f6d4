"""`--config FILE`: flag values from a TOML or YAML file, checked exactly like the command line.

A config file's keys are the flag names without dashes. Each value goes through its flag's own
`type` and `choices`, as argparse would treat the same value typed after the flag, and becomes
that flag's default, so a flag on the command line still wins. argparse itself never checks
defaults, which is why this cannot be a plain `parser.set_defaults(**file)`: `optimizer = "foo"`
would train until the optimizer is built, `num_vectors = 2.5` would pass every range check.

Every mistake is one `ArgumentError` line naming the file and the key, before anything loads;
so is a range error of a value that came from the file (`blame`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinv_lib.common.errors import ArgumentError, TinvError

NOT_SETTINGS = ("help", "config")  # flags a config file cannot set


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The `--config` flag, read by `parse_with_config`."""
    parser.add_argument("--config", help="TOML or YAML file of flag values (keys: flag names without dashes; "
                                         "command-line flags win)")


@dataclass
class ConfigFile:
    """A config file's values, converted and checked by their flags."""

    name: str  # the path as the user gave it
    values: dict[str, Any]  # flag destination -> value

    def blame(self, error: TinvError, args: argparse.Namespace) -> TinvError:
        """`error`, when it is about a flag whose value came from this file, reworded to name the
        file and key (the checks word their errors `--flag ...`)."""
        message = str(error)
        for key, value in self.values.items():
            flag = f"--{key}"
            rest = message[len(flag):]
            if not message.startswith(flag) or rest[:1].isalnum() or rest[:1] == "_" or getattr(args, key, None) != value:
                continue
            return ArgumentError(f"{self.name}: {key}{rest}" if rest[:1] in (" ", ":") else f"{self.name}: {key}: {message}")
        return error


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None, required: list[str],
                      check: Callable[[argparse.Namespace], None] | None = None) -> argparse.Namespace:
    """Parse `argv` with defaults from `--config` when given; then require `required` (they may come
    from the file) and run `check`. A check's error about a value from the file names the file."""
    argv = sys.argv[1:] if argv is None else argv
    first, _ = parser.parse_known_args(argv)
    config = read_config(first.config, parser) if getattr(first, "config", None) else None
    if config is not None:
        parser.set_defaults(**config.values)
    args = parser.parse_args(argv)
    try:
        missing = [f"--{name}" for name in required if getattr(args, name) in (None, "")]
        if missing:
            raise ArgumentError(f"missing required setting(s): {', '.join(missing)}")
        if check is not None:
            check(args)
    except TinvError as error:
        raise (config.blame(error, args) if config is not None else error) from None
    return args


def read_config(name: str, parser: argparse.ArgumentParser) -> ConfigFile:
    """The file's values, each converted and checked by its flag; `ArgumentError` on the first
    mistake (all unknown keys in one line)."""
    raw = _load(Path(name), name)
    actions = {action.dest: action for action in parser._actions if action.dest not in NOT_SETTINGS}
    unknown = [key for key in raw if str(key).replace("-", "_") not in actions]
    if unknown:
        raise ArgumentError(f"{name}: unknown setting(s) {', '.join(map(str, unknown))} (keys are the flag names "
                            "without dashes; see --help)")
    values = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        try:
            values[dest] = _convert(actions[dest], value)
        except ValueError as error:
            raise ArgumentError(f"{name}: {key}: {error}") from None
    return ConfigFile(name, values)


def _load(path: Path, name: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ArgumentError(f"--config {name}: {error.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:  # YAML, which also reads JSON
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as error:  # noqa: BLE001 - TOML and YAML parsers raise their own types
        raise ArgumentError(f"--config {name}: cannot parse ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"--config {name}: expected a table of flag values")
    return data


def _convert(action: argparse.Action, value: Any) -> Any:
    """`value` as the flag would hold it after the same text on the command line; `ValueError`
    says what is wrong in argparse's words. An empty value (YAML `key:`, `null`) leaves the flag's
    own default."""
    if value is None:
        return action.default
    if action.nargs == 0:  # an on/off flag (store_true)
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, not {value!r}")
        return action.const if value else action.default
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, item) for item in items]
    if isinstance(value, list):
        raise ValueError(f"expected one value, not a list {value!r}")
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (bool, dict, list)) or value is None:  # None inside a list
        raise ValueError(f"expected a value as typed after --{action.dest}, not {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError as error:  # the type's own words, as argparse prints them
        raise ValueError(str(error)) from None
    except (TypeError, ValueError):
        raise ValueError(f"invalid {getattr(action.type, '__name__', 'value')} value: {text!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"invalid choice: {converted!r} (choose from {', '.join(map(str, action.choices))})")
    return converted
