"""The `fedge` command line: one typer app whose subcommands live beside the feature they drive.

Nothing imports this module; it imports each role's CLI module, and those import
their heavy dependencies inside the commands, so `fedge edge agent` starts
without a training stack. Errors are shown here, once, in one style: what went
wrong and what to do, on stderr, with a non-zero exit; a traceback (never with
local variables) only with `fedge --debug`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from fedge.client import cli as client_cli
from fedge.console import err_console
from fedge.edge import cli as edge_cli
from fedge.errors import UserError
from fedge.server import cli as server_cli
from fedge.sim import cli as sim_cli


@dataclass
class CliState:
    """What the root options set for the whole invocation (click's context object)."""

    debug: bool = False


def show_error(message: str, hint: str = "") -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err_console.print(f"[bold]hint:[/] {escape(hint)}", soft_wrap=True)


class FedgeGroup(TyperGroup):
    """The root group: runs a command and turns whatever it raises into the one error style."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        state = extra.setdefault("obj", CliState())
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:
            err.show()
            code = err.exit_code
        except click.ClickException as err:  # a bad option value or a missing argument, before the command runs
            where = err.ctx.command_path if isinstance(err, click.UsageError) and err.ctx else "fedge"
            show_error(err.format_message(), f"see `{where} --help`")
            code = err.exit_code
        except click.Abort:
            show_error("interrupted")
            code = 130
        except UserError as err:
            if state.debug:
                raise
            show_error(err.message, err.hint)
            code = 1
        except Exception as err:
            if state.debug:
                raise
            lines = str(err).strip().splitlines() or [""]
            more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
            show_error(f"{type(err).__name__}: {lines[0]}{more}",
                       "an unexpected failure; `fedge --debug ...` shows where it happened")
            code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=FedgeGroup, name="fedge", help="fedge: federated and edge adaptation of models.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", envvar="FEDGE_DEBUG",
                                        help="on an error, also show the traceback")] = False,
) -> None:
    """fedge: federated and edge adaptation of models."""
    if isinstance(ctx.obj, CliState):
        ctx.obj.debug = debug


sim_cli.register(app)
server_cli.register(app)
client_cli.register(app)
edge_cli.register(app, run_source=sim_cli.run_source)


def main() -> None:
    app(prog_name="fedge")


if __name__ == "__main__":
    main()
