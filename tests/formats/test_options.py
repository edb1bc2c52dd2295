"""The option types every CLI shares: what they accept, and the message that names the option."""

import argparse

import pytest

from histoserve.formats.options import (
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    ClientTls,
    ListOf,
    OptionError,
    add_tls_arguments,
    output_file,
    tls_from,
)


def parse(type_, text):
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=type_)
    return parser.parse_args(["--value", text]).value


@pytest.mark.parametrize("type_, text, value", [
    (POSITIVE_INT, "3", 3), (NON_NEGATIVE_INT, "0", 0), (POSITIVE, "0.5", 0.5), (FRACTION, "1", 1.0), (FRACTION, "0", 0.0),
    (ListOf(POSITIVE), "10, 20,40.5", [10.0, 20.0, 40.5]),
])
def test_values_in_range_are_parsed(type_, text, value):
    assert parse(type_, text) == value


@pytest.mark.parametrize("type_, text, message", [
    (POSITIVE_INT, "0", "must be at least 1, got 0"), (POSITIVE_INT, "-1", "must be at least 1, got -1"),
    (POSITIVE_INT, "2.5", "not an integer: '2.5'"), (POSITIVE, "0", "must be above 0, got 0"),
    (POSITIVE, "nan", "must be a finite number, got nan"), (FRACTION, "1.5", "must be in [0, 1], got 1.5"),
    (ListOf(POSITIVE), "abc", "'abc': not a number: 'abc'"), (ListOf(POSITIVE), "10,,20", "expected comma-separated values, got '10,,20'"),
    (ListOf(POSITIVE), "10,-2", "'-2': must be above 0, got -2"),
])
def test_values_out_of_range_are_refused_naming_the_option(type_, text, message):
    with pytest.raises(argparse.ArgumentError) as refused:
        parse(type_, text)
    assert str(refused.value) == f"argument --value: {message}"


def test_values_given_in_code_are_checked_with_the_same_rule():
    assert FRACTION.check(0.99, "--min-agreement") == 0.99
    with pytest.raises(OptionError, match=r"--min-agreement: must be in \[0, 1\], got 1.5"):
        FRACTION.check(1.5, "--min-agreement")
    with pytest.raises(OptionError, match="--epochs: expected an integer, got 2.0"):
        POSITIVE_INT.check(2.0, "--epochs")
    with pytest.raises(OptionError, match="expected a number, got True"):
        POSITIVE.check(True, "--lr")


def test_an_output_file_needs_an_existing_folder(tmp_path):
    assert parse(output_file, str(tmp_path / "out.jsonl")) == tmp_path / "out.jsonl"
    with pytest.raises(argparse.ArgumentError, match="does not exist"):
        parse(output_file, str(tmp_path / "missing" / "out.jsonl"))
    with pytest.raises(argparse.ArgumentError, match="is a folder"):
        parse(output_file, str(tmp_path))


def test_the_tls_options_are_one_set(tmp_path):
    parser = argparse.ArgumentParser()
    add_tls_arguments(parser)
    assert tls_from(parser.parse_args([])) is None
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    assert tls_from(parser.parse_args(["--ssl-root-certificates", str(ca)])) == ClientTls(str(ca))
    with pytest.raises(OptionError, match="--ssl-private-key: no such file"):
        tls_from(parser.parse_args(["--ssl-private-key", str(tmp_path / "k"), "--ssl-certificate-chain", str(ca)]))
    with pytest.raises(OptionError, match="needs both"):
        tls_from(parser.parse_args(["--ssl", "--ssl-private-key", str(ca)]))
