"""What train.py and infer.py share before any model loads: flag parsing whose errors are one line."""

from __future__ import annotations

import pathlib
import re
import sys

from absl import flags


def parse_flags(program: str, argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parse `argv` into `flag_values`; a bad flag value, a missing `--config` file or a field the config
    does not have in a `--config.…` override ends the program with one line naming it (absl and
    ml_collections would raise a traceback of tens of lines). Returns the arguments left."""
    config = _config_file(argv)
    if config is not None and not pathlib.Path(config).is_file():
        sys.exit(f"{program}: --config: file not found: {config}")
    try:
        return flag_values(argv)
    except flags.Error as e:
        sys.exit(f"{program}: {e}")
    except (AttributeError, KeyError) as e:  # ml_collections: a locked config has no such field
        sys.exit(f"{program}: {_unknown_field(argv, e)}")


def flags_parser(program: str):
    """`parse_flags` for `app.run(main, flags_parser=…)`."""
    return lambda argv: parse_flags(program, argv)


def _config_file(argv: list[str]) -> str | None:
    """The file of `--config=FILE[:ARG]` or `--config FILE`, if given."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else \
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if value is not None:
            return value if pathlib.Path(value).is_file() else value.split(":", 1)[0]
    return None


def _unknown_field(argv: list[str], error: Exception) -> str:
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):  # AttributeError(KeyError(message))
        inner = inner.args[0]
    text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
    name = re.search(r"'(\w+)'", text)
    guess = re.search(r'Did you mean "(\w+)"', text)
    field = name.group(1) if name else text
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    flag = next((o for o in overrides if field in o.split(".")), "a --config.… override")
    return f"{flag}: the config has no field {field!r}" + (f" (did you mean {guess.group(1)!r}?)" if guess else "")
