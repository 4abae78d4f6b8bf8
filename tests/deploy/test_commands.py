"""Every ``ryzanstein`` command in deploy/, the Procfile and the docs exists, with the flags it uses.

Deploy files and the Procfile run their commands as written: each must parse with the real
command-line parser (sample values for the variables), and each flag must appear in
``ryzanstein <command> --help``. The docs write commands with placeholders (``[--tp K]``), so there
the subcommand and its flags are checked against ``--help``.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from functools import cache

import pytest

from ryzanstein.cli import COMMANDS, build_parser
from tests.deploy.commands import DocUse, Use, deploy_uses, doc_uses

DEPLOY_USES = deploy_uses()
DOC_USES = list(doc_uses())


@cache
def help_flags(command: str) -> frozenset[str]:
    """The flags ``ryzanstein <command> --help`` lists, from the installed entry point's own output,
    with those of its verbs (``batch submit --help`` ...) when it has some."""
    text = _help(command)
    verbs = re.search(r"positional arguments:\n  VERB\n((?:    \S.*\n|      .*\n)+)", text)
    for verb in re.findall(r"^    (\w+)", verbs.group(1), flags=re.MULTILINE) if verbs else []:
        text += _help(command, verb)
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def _help(*words: str) -> str:
    answer = subprocess.run([sys.executable, "-m", "ryzanstein", *words, "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert answer.returncode == 0, answer.stderr
    return answer.stdout


def test_the_files_use_the_commands_that_matter() -> None:
    used = {(u.where.split(":")[0], u.argv[1]) for u in DEPLOY_USES}
    assert {("Procfile", "broker"), ("Procfile", "balancer"), ("Procfile", "worker")} <= used
    assert {c for f, c in used if f == "docker-compose.yml"} == {"balancer", "worker", "gateway", "health"}
    assert {c for f, c in used if f.startswith("k8s/")} == {"balancer", "worker", "gateway"}
    assert {c for f, c in used if f.startswith("systemd/")} == {"balancer", "worker", "gateway"}
    assert {"worker", "balancer", "status", "up", "submit"} <= {u.command for u in DOC_USES}


@pytest.mark.parametrize("use", DEPLOY_USES, ids=lambda u: u.where)
def test_deploy_commands_parse_and_their_flags_exist(use: Use) -> None:
    command = use.argv[1]
    assert command in COMMANDS, f"{use.where}: no command {command!r}"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            build_parser().parse_args(use.argv[1:])
        except SystemExit:
            pytest.fail(f"{use.where}: `{' '.join(use.argv)}` does not parse: {stderr.getvalue()}")
    flags = {a.split("=", 1)[0] for a in use.argv[2:] if a.startswith("--")}
    assert flags <= help_flags(command), f"{use.where}: unknown flags {sorted(flags - help_flags(command))}"


@pytest.mark.parametrize("use", DOC_USES, ids=lambda u: u.where)
def test_doc_commands_and_flags_exist(use: DocUse) -> None:
    assert use.command in COMMANDS, f"{use.where}: no command {use.command!r}"
    missing = set(use.flags) - help_flags(use.command)
    assert not missing, f"{use.where}: `ryzanstein {use.command}` has no {sorted(missing)}"


def test_the_checker_catches_a_wrong_flag() -> None:
    assert "--metrics-port" in help_flags("worker") and "--no-such-flag" not in help_flags("worker")
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--kv-dtype", "int3"])
