"""Strings that reach shell command lines: validated where quoting cannot help, quoted elsewhere.

Rules (tested in tests/launch/test_injection.py):
* Everything we render for a shell (dry-run lines, the sbatch script) goes through `shlex.quote`;
  we never run anything with `shell=True`.
* Host names are validated, not quoted: they reach ssh/pdsh/torchrun as arguments, and a name such
  as `-oProxyCommand=…` or `node1;rm …` is never a host anyway.
* Values the DeepSpeed pdsh runner puts into its remote command line unquoted (the working
  directory, the arguments of the rank program) must be plain paths; environment variables never
  travel through that command line (see `launch.hostfile`).
* `#SBATCH` lines are read by sbatch, not bash: their values must be single plain tokens (a newline
  there would start a new, executed line of the script).
"""

from __future__ import annotations

import re
import shlex

HOST_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")  # names and IPv4
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PLAIN_RE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")  # survives an unquoted shell word unchanged
SBATCH_VALUE_RE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def check_host(name: str, what: str) -> str:
    if not HOST_RE.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a valid host name (letters, digits, '.', '-', "
                         "'_'; no spaces or shell characters)")
    return name


def check_port(port: int, what: str) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} {port} is not a TCP port (1-65535)")
    return port


def parse_endpoint(endpoint: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` → (host, port), both validated."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{what} {endpoint!r} must look like HOST:PORT (e.g. node0:29500)")
    return check_host(host, what + " host"), check_port(int(port), what + " port")


def check_env_name(name: str, what: str = "environment variable") -> str:
    if not ENV_NAME_RE.match(name):
        raise ValueError(f"{what} name {name!r} is not a valid shell variable name")
    return name


def check_plain(value: str, what: str, why: str) -> str:
    """A value that will appear unquoted in someone else's shell command line."""
    if not PLAIN_RE.match(value):
        raise ValueError(f"{what} {value!r} contains characters other than letters, digits and "
                         f"'_@%+=:,./-': {why}")
    return value


def check_sbatch_value(value: str, what: str) -> str:
    if not SBATCH_VALUE_RE.match(value):
        raise ValueError(f"{what} {value!r} must be one plain word (letters, digits, "
                         "'_@%+=:,./-') to be written as an #SBATCH option")
    return value


def shell_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    """One copy-pasteable bash line: `env K=V … argv…`, every word quoted."""
    words = []
    if env:
        words = ["env"] + [f"{check_env_name(k)}={shlex.quote(v)}" for k, v in env.items()]
        return " ".join(words + [shlex.quote(a) for a in argv])
    return shlex.join(argv)
