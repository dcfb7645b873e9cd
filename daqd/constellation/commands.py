"""The satellite's CSCP commands: the standard ones with their descriptions, and how a receiver's
`cmd_<name>` methods become user commands `<receiver>_<name>` (their arguments and descriptions)."""

from __future__ import annotations

import inspect
import re
from typing import Any

import msgpack

from daqd.runstate import State

RUN_ID = re.compile(r"^[\w-]{1,80}$")  # Constellation's ^[\w-]+$, and daqd's length limit

# command -> (description, payload it takes); transitions are listed with the rest
STANDARD: dict[str, tuple[str, str]] = {
    "get_name": ("Return the canonical name of the satellite.", "No arguments."),
    "get_commands": ("Return the commands of the satellite with descriptions.", "No arguments."),
    "get_state": (
        "Return the state (verb), its code (payload) and when it last changed (tags).",
        "No arguments.",
    ),
    "get_status": ("Return a one-line status of the satellite.", "No arguments."),
    "get_config": ("Return the configuration received with initialize.", "No arguments."),
    "get_run_id": ("Return the current run id, or the last one.", "No arguments."),
    "get_version": ("Return the daqd version.", "No arguments."),
    "get_cnstln_version": (
        "Return the Constellation version whose protocols are spoken.",
        "No arguments.",
    ),
    "get_role": (
        "Return the autonomy role (verb) and its heartbeat flags (payload).",
        "No arguments.",
    ),
    "initialize": (
        "Initialize: stop receiving, take the configuration.",
        "Arguments: config (map)",
    ),
    "launch": ("Launch: receivers start receiving.", "No arguments."),
    "land": ("Land: receivers stop receiving.", "No arguments."),
    "start": ("Start a run.", "Arguments: run_id (str, letters, digits, '_' and '-')"),
    "stop": ("Stop the run; its condition is in get_status.", "No arguments."),
    "reconfigure": (
        "Reconfigure in ORBIT: the map's receiver / publisher tables replace the running ones "
        "(those that did not change keep running untouched).",
        "Arguments: partial config (map)",
    ),
    "shutdown": ("Stop daqd (in NEW, INIT, SAFE or ERROR only).", "No arguments."),
}
HIDDEN: dict[str, tuple[str, str]] = {
    "_get_commands": ("Return the hidden commands with descriptions.", "No arguments."),
    "_interrupt": ("Interrupt: end any run and go to SAFE.", "No arguments."),
    "_failure": ("Go to ERROR (initialize leads back to INIT).", "No arguments."),
    "_get_services": ("Return the services offered: name -> port.", "No arguments."),
    "_get_remotes": (
        "Return what the other hosts of the group offer: host UUID -> service -> URI.",
        "No arguments.",
    ),
}
TRANSITION_COMMANDS = {
    "initialize": "initialize",
    "launch": "launch",
    "land": "land",
    "start": "start",
    "stop": "stop",
    "reconfigure": "reconfigure",
    "_interrupt": "interrupt",
}
SHUTDOWN_STATES = frozenset({State.NEW, State.INIT, State.SAFE, State.ERROR})


class WrongArgument(Exception):
    """The payload does not fit the command: INCOMPLETE "Wrong argument: ..."."""


def packable(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def parameters(fn: Any) -> list[str]:
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def describe_user_command(rec: str, cmd: str, fn: Any) -> str:
    doc = (inspect.getdoc(fn) or f"Command {cmd} of receiver {rec}.").strip().splitlines()[0]
    params = parameters(fn)
    args = f"Arguments: {', '.join(params)}" if params else "No arguments."
    return f"{doc} (receiver {rec}, daqctl cmd {rec} {cmd})\n{args}"
