"""Check a ``--run-config`` override string before it is submitted to Flower.

Flower refuses an unknown key at submission with "[code: 15] Invalid run configuration." and names
nothing; a bad value fails later, inside the ServerApp. This check parses the string exactly as
``flwr run --run-config`` does (:func:`flwr.common.config.parse_config_args`: space-separated
``key=value`` pairs, TOML values) and validates the result with
:func:`fedlora.run_config.parse_run_config`, the one validation of the run config::

    python -m simulations.check_config "num-server-rounds=3 strategy='hetero' ranks='16,8,4'"

Exit status 0 and no output if the overrides are valid; otherwise 2 and one line on stderr naming the
key, e.g. ``run config 'num-server-round': unknown key (did you mean 'num-server-rounds'?)``.
``scripts/run.sh`` and ``deploy/submit.sh`` run it before they start or reach Flower.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

from fedlora.run_config import ConfigError, parse_run_config

#: Flower's pattern for one ``key=value`` pair (flwr.common.config.parse_config_args)
PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_overrides(text: str) -> dict[str, Any]:
    """The overrides of one ``--run-config`` string as Flower reads them; ConfigError names a bad pair.

    Beyond Flower: text that is no ``key=value`` pair (Flower drops it silently) and a key given twice
    are errors too."""
    from flwr.common.config import parse_config_args

    if text.strip().endswith(".toml") and len(text.split()) == 1:  # a TOML file of overrides
        try:
            return parse_config_args([text.strip()])
        except OSError as err:
            raise ConfigError(text.strip(), f"cannot read the overrides file: {err}") from None
    stray = PAIR.sub(" ", text).split()
    if stray:
        raise ConfigError(stray[0], "expected key=value (values in TOML syntax: 3, 0.5, true, 'text')")
    pairs = PAIR.findall(text)
    seen: set[str] = set()
    for key, value in pairs:
        if key in seen:
            raise ConfigError(key, "given more than once")
        seen.add(key)
        try:
            parse_config_args([f"{key}={value}"])
        except Exception:  # noqa: BLE001 - Flower raises click.ClickException naming nothing
            raise ConfigError(key, f"{value} is not a TOML value (a number, true/false or a quoted "
                                   "'string')") from None
    return parse_config_args([text]) if text.strip() else {}


def check(texts: Sequence[str]) -> dict[str, Any]:
    """Validate the overrides of every ``--run-config`` string (later strings win, as in Flower)."""
    overrides: dict[str, Any] = {}
    for text in texts:
        overrides.update(parse_overrides(text))
    parse_run_config(overrides)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.check_config", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_config", nargs="*", help='override strings as given to flwr run --run-config, "k=v k2=v2"')
    args = ap.parse_args(argv)
    try:
        check(args.run_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
