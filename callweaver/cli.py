"""Operator commands (`flask --app wsgi <command>`): the same jobs the workers run, on demand."""
from __future__ import annotations

import json

import click
from flask import Flask

from .lifecycle import CallRequestError
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

    @app.cli.command("save-workflow")
    @click.argument("workflow_id")
    @click.argument("flow", type=click.File("r"))
    def save_workflow(workflow_id: str, flow) -> None:
        """Store FLOW (a make-call body's JSON or the web app's export: nodes, edges, globalPrompt, config) as
        WORKFLOW_ID's flow, validated as make-call validates it (and refused when it names no flow): the way to write
        an id listed in PINNED_WORKFLOW_IDS, which make-call does not."""
        svc = app.extensions["callweaver"]
        try:
            body = json.load(flow)
            workflow = svc.lifecycle.storable_workflow(body)
            svc.store.save_workflow(workflow_id, workflow.snapshot)
        except ValueError as exc:
            raise click.ClickException(f"not saved: {flow.name} is not JSON ({exc})") from None
        except CallRequestError as exc:
            raise click.ClickException(f"not saved: {exc.message}") from None
        except StoreError as exc:
            raise click.ClickException(f"not saved: {exc}") from None
        unpinned = workflow_id not in svc.settings.pinned_workflow_ids
        click.echo(f"saved workflow {workflow_id!r}: {len(workflow.nodes)} node(s)"
                   + (" (not in PINNED_WORKFLOW_IDS: a make-call may replace it)" if unpinned else ""))
