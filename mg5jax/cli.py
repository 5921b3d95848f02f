"""What the programs (train.py, infer.py, `python -m mg5jax.…`) share before any model loads: flag parsing
whose errors are one line, and log lines that keep clear of the progress bars."""

from __future__ import annotations

import difflib
import importlib.util
import logging
import pathlib
import sys
from collections.abc import Callable, Sequence

from absl import flags
from tqdm import tqdm


def parse_flags(program: str, argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parse `argv` into `flag_values`; a bad flag value, a missing `--config` file or a field the config
    does not have in a `--config.…` override ends the program with one line naming it (absl and
    ml_collections would raise a traceback of tens of lines). Returns the arguments left."""
    config = _config_file(argv)
    if config is not None and not pathlib.Path(config[0]).is_file():
        sys.exit(f"{program}: --config: file not found: {config[0]}")
    if repeated := _repeated_override(argv):
        sys.exit(f"{program}: {repeated} is given more than once: give it once (a tuple would join the values, "
                 "other fields keep the last)")
    try:
        return flag_values(argv)
    except flags.Error as e:
        sys.exit(f"{program}: {e}")
    except (AttributeError, KeyError):  # ml_collections: a locked config has no such field
        unknown = _unknown_override(argv, config) if config is not None else None
        if unknown is None:  # raised by the config file itself: its traceback says where
            raise
        sys.exit(f"{program}: {unknown}")
    except ValueError as e:  # ml_collections: an override path that is no dotted name (`--config.a..b`)
        if not str(e).startswith("Could not parse"):
            raise
        sys.exit(f"{program}: {e}")


def flags_parser(program: str):
    """`parse_flags` for `app.run(main, flags_parser=…)`."""
    return lambda argv: parse_flags(program, argv)


def _config_file(argv: list[str]) -> tuple[str, str | None] | None:
    """(file, argument) of the last `--config=FILE[:ARG]` or `--config FILE[:ARG]` (absl keeps the last)."""
    found = None
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else \
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if value is not None:
            path, _, extra = value.partition(":")
            found = (value, None) if pathlib.Path(value).is_file() or not extra else (path, extra)
    return found


def _repeated_override(argv: list[str]) -> str | None:
    """The first `--config.a.b` override given twice (up to the `--` that ends the flags)."""
    seen = set()
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("--config."):
            name = arg.split("=", 1)[0]
            if name in seen:
                return name
            seen.add(name)
    return None


def _unknown_override(argv: list[str], config: tuple[str, str | None]) -> str | None:
    """`--config.a.b: the config has no field 'b'` for the first override whose path the config lacks."""
    try:
        spec = importlib.util.spec_from_file_location("_mg5jax_cli_config", config[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config(config[1]) if config[1] is not None else module.get_config()
    except Exception:  # noqa: BLE001 - the config file's own error: absl's traceback shows it
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        flag = arg.split("=", 1)[0]
        node = cfg
        for field in flag[len("--config."):].split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if field not in keys:
                guess = difflib.get_close_matches(field, keys, n=1)
                return f"{flag}: the config has no field {field!r}" + (f" (did you mean {guess[0]!r}?)" if guess else "")
            node = node[field]
    return None


def check_config_fields(program: str, cfg, config_file: str) -> None:
    """End the program with one line naming each field the config file sets that configs/base.py does
    not have (a typo such as `c.data.trian_path` would otherwise be ignored), with the closest known one.
    Without the repository's `configs` package on the path (a config file of its own), nothing is checked."""
    try:
        from configs import base
    except ImportError:
        return
    from mg5jax.training.checkpoint import flat_config

    known = list(flat_config(base.get_config().to_dict()))
    unknown = [k for k in flat_config(cfg.to_dict()) if k not in known]
    if unknown:
        named = ", ".join(f"{k!r}" + (f" (did you mean {g[0]!r}?)" if (g := difflib.get_close_matches(k, known, n=1))
                                      else "") for k in unknown)
        sys.exit(f"{program}: {config_file}: sets fields configs/base.py does not have: {named}")


class _AboveProgressBars(logging.Handler):
    """A handler that clears the console's progress bars, lets `inner` write the record, and redraws them."""

    def __init__(self, inner: logging.Handler):
        super().__init__()
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.inner.level:
            with tqdm.external_write_mode(file=sys.stderr):
                self.inner.handle(record)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
        super().close()


def logs_above_progress_bars() -> None:
    """Have the root logger's handlers (absl's, once `app.run` started) write each record on its own line
    above the progress bars, not on the line a bar is drawing."""
    root = logging.getLogger()
    root.handlers = [h if isinstance(h, _AboveProgressBars) else _AboveProgressBars(h) for h in root.handlers]


def run_module(program: str, usage: str, make_flags: Callable[[Sequence[str]], flags.FlagValues],
               main: Callable[[Sequence[str]], object], errors: tuple[type[Exception], ...] = ()) -> None:
    """`python -m <program>`: `--help` prints `usage` and the flags of `make_flags(sys.argv)`; otherwise
    `main(sys.argv)` runs, and a flag error or one of `errors` ends it with one line."""
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in sys.argv[1:]):
        print(f"{usage}\n\n{make_flags(sys.argv).get_help()}")
        sys.exit(0)
    try:
        main(sys.argv)
    except (ValueError, FileNotFoundError, flags.Error, *errors) as e:
        sys.exit(f"{program}: {e}")
