"""Operator commands (`flask --app wsgi <command>`): the same jobs the workers run, on demand."""
from __future__ import annotations

import click
from flask import Flask

from .retention import purge_ended_calls
from .store import StoreError


def register_cli(app: Flask) -> None:
    @app.cli.command("purge-calls")
    @click.option("--older-than-days", type=click.IntRange(min=1), default=None,
                  help="retention in days (default: RETENTION_DAYS)")
    def purge_calls(older_than_days: int | None) -> None:
        """Delete calls (with their turns and statuses) that ended longer ago than the retention, and empty
        transcripts older than TRANSCRIPT_RETENTION_DAYS."""
        svc = app.extensions["callweaver"]
        days = older_than_days or svc.settings.retention_days
        try:
            purged = purge_ended_calls(svc.store, days, svc.settings.transcript_retention_days)
        except StoreError as exc:  # the store is down or unwritable: the operator's to fix, said in one line
            raise click.ClickException(f"nothing purged: {exc}") from None
        click.echo(f"purged {purged} call(s) that ended more than {days} day(s) ago")
