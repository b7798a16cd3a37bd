"""What every command shares: the error-to-exit-code group, output, opening the store."""

from __future__ import annotations

import json
import re
import sqlite3
import sys

import click

from ..store import CompstoreError, Store
from ..store.catalog import REBUILD_ADVICE, is_damage


def emit(as_json: bool, doc, text: str) -> None:
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        click.echo(text)


def one_line(message: str) -> str:
    """`message` with its control characters escaped: a ref or repo id given with a
    newline in it is named in the error, and the error stays one line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], message)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


class Group(click.Group):
    """Turns every `CompstoreError` into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CompstoreError as e:
            click.echo(f"Error: {one_line(str(e))}", err=True)
            sys.exit(e.exit_code)
        except sqlite3.DatabaseError as e:
            if is_damage(e):  # a page of it went bad after it opened
                click.echo(f"Error: the store's catalog is damaged ({e}): {REBUILD_ADVICE}", err=True)
                sys.exit(1)
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            click.echo(f"Error: the store's catalog stayed busy past the timeout ({e}); another "
                       "compstore process is using it: retry when it finishes", err=True)
            sys.exit(1)


def open_store(ctx: click.Context) -> Store:
    store = Store(ctx.obj)
    ctx.call_on_close(store.close)
    return store
