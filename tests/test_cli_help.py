"""Every ``--help`` page: each subcommand says what it does, each option has help."""

from __future__ import annotations

import argparse

import pytest

from stemdask.cli import build_parser, main
from stemdask.cli.common import CLUSTER_TIMEOUT


def parsers() -> dict[str, argparse.ArgumentParser]:
    return build_parser()[1]  # every command with all its options (built from the Python API)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    # argparse lists a parser's actions only in this attribute; read here, never in the package
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(parsers()))
def test_every_subcommand_has_a_description_and_every_option_help(name):
    parser = parsers()[name]
    assert parser.description, f"stemdask {name} has no description"
    missing = [a.option_strings[0] for a in options(parser) if not (a.help or "").strip()]
    assert not missing, f"stemdask {name}: options without help: {missing}"
    for action in options(parser):
        if action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list):
            assert "default" in action.help, (
                f"stemdask {name} {action.option_strings[0]}: help does not say the default"
            )


@pytest.mark.parametrize("name", sorted(parsers()))
def test_help_pages_print(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([*name.split(), "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: stemdask {name}") and parsers()[name].description.split()[0] in out


def test_reconstruct_has_one_group_per_method_and_declares_shared_options_once(capsys):
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    out = capsys.readouterr().out
    for method in ("virtual", "com", "icom", "dpc", "ricom", "ssb"):
        assert f"--method {method}: " in out
    assert out.count("--com-reference {bf,mean}\n") == 1
    assert "default bf for com, mean for icom/dpc/ricom" in " ".join(out.split())
    assert "--kernel-size N" in out and "default 61" in " ".join(out.split()) and "--c10 Å|auto" in out


def test_the_cli_timeout_default_is_the_cluster_modules():
    from stemdask.cluster import DEFAULT_TIMEOUT

    assert CLUSTER_TIMEOUT == DEFAULT_TIMEOUT
