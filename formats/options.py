"""Command-line options every stage's CLI shares: value types that check their range when the command
line is parsed (argparse then names the option: "argument --concurrency: must be at least 1, got 0"),
and the one set of TLS options for every gRPC caller.

The types also check values given in code (`Range.check(value, "--name")`), so a config dataclass
refuses the same values with the same message before any work starts.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path


class OptionError(ValueError):
    """An option value out of range or unusable; the message names the option."""


@dataclass(frozen=True)
class Range:
    """int or float within [low, high] (open at either end when asked)."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.kind.__name__

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        if self.high is not None:
            return f"{'below' if self.high_open else 'at most'} {self.high:g}"
        return f"a {self.kind.__name__}"

    def problem(self, value) -> str | None:
        if self.kind is float and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {self.describe()}, got {value:g}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {self.describe()}, got {value:g}"
        return None

    def __call__(self, text: str):
        """argparse's type: the parsed value, or ArgumentTypeError (argparse adds the option's name)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if self.kind is int else 'a number'}: {text!r}") from None
        if problem := self.problem(value):
            raise argparse.ArgumentTypeError(problem)
        return value

    def check(self, value, option: str):
        """A value given in code: returned, or OptionError naming the option."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            raise OptionError(f"{option}: expected {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        if problem := self.problem(value):
            raise OptionError(f"{option}: {problem}")
        return value


POSITIVE_INT = Range(int, 1)
NON_NEGATIVE_INT = Range(int, 0)
POSITIVE = Range(float, 0, low_open=True)
NON_NEGATIVE = Range(float, 0)
FRACTION = Range(float, 0, 1)             # [0, 1]
OPEN_FRACTION = Range(float, 0, 1, high_open=True)  # [0, 1)


@dataclass(frozen=True)
class ListOf:
    """Comma-separated values of `item`: "10,20,40" → [10.0, 20.0, 40.0]."""

    item: Range

    @property
    def __name__(self) -> str:
        return f"list of {self.item.kind.__name__}"

    def __call__(self, text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        values = []
        for part in parts:
            try:
                values.append(self.item(part))
            except argparse.ArgumentTypeError as error:
                raise argparse.ArgumentTypeError(f"{part!r}: {error}") from None
        return values


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def output_file(text: str) -> Path:
    """A file to write: its folder must exist, and it must not be a folder itself (checked before any
    work, so a run is never lost to a typo in the output path)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {path.parent} is not writable")
    return path


@dataclass(frozen=True)
class ClientTls:
    """gRPC over TLS. `root_certificates`: the CA bundle that signed the server (default: the
    system's); `private_key` + `certificate_chain`: this client's identity, for mutual TLS. PEM files."""

    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None

    def problems(self) -> list[str]:
        found = []
        if bool(self.private_key) != bool(self.certificate_chain):
            found.append("mutual TLS needs both --ssl-private-key and --ssl-certificate-chain")
        for option, path in (("--ssl-root-certificates", self.root_certificates), ("--ssl-private-key", self.private_key),
                             ("--ssl-certificate-chain", self.certificate_chain)):
            if path and not os.path.isfile(path):
                found.append(f"{option}: no such file: {path}")
        return found

    def client_arguments(self) -> dict:
        """tritonclient.grpc.InferenceServerClient's TLS arguments (OptionError when unusable)."""
        if problems := self.problems():
            raise OptionError("; ".join(problems))
        return {"ssl": True, "root_certificates": self.root_certificates, "private_key": self.private_key,
                "certificate_chain": self.certificate_chain}


TLS_OPTIONS = (
    ("--ssl", "gRPC over TLS"),
    ("--ssl-root-certificates", "CA bundle (PEM) that signed the server; default: the system's"),
    ("--ssl-private-key", "mutual TLS: this client's private key (PEM)"),
    ("--ssl-certificate-chain", "mutual TLS: this client's certificate chain (PEM)"),
)


def environment_variable(option: str) -> str:
    """The variable that also sets `option` where options come from the environment too (Locust's
    configargparse parser, so that a Job sets every worker's options at once): --triton-url is
    HISTOSERVE_TRITON_URL."""
    return "HISTOSERVE_" + option.removeprefix("--").upper().replace("-", "_")


def add_tls_arguments(parser, environment: bool = False) -> None:
    """The TLS options on an argparse parser or group; with `environment`, each also read from its
    `environment_variable` (for Locust's configargparse parser, which takes `env_var`)."""
    for option, text in TLS_OPTIONS:
        extra = {"env_var": environment_variable(option)} if environment else {}
        if option == "--ssl":
            parser.add_argument(option, action="store_true", help=text, **extra)
        else:
            parser.add_argument(option, default="", help=text, **extra)


def tls_from(options) -> ClientTls | None:
    """The TLS settings of parsed options (None: plaintext). Raises OptionError for missing files."""
    files = (options.ssl_root_certificates, options.ssl_private_key, options.ssl_certificate_chain)
    if not (options.ssl or any(files)):
        return None
    tls = ClientTls(*(str(f) if f else None for f in files))
    if problems := tls.problems():
        raise OptionError("; ".join(problems))
    return tls


def add_command(commands, name: str, module, summary: str) -> argparse.ArgumentParser:
    """Subcommand `name` from a module that defines it: its docstring is the description, its
    `add_arguments(parser)` the options, and its `run(args, parser) -> int` what runs (the stage's
    main calls `args.run(args, args.parser)`)."""
    command = commands.add_parser(name, help=summary, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(command)
    command.set_defaults(run=module.run, parser=command)
    return command
