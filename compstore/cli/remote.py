"""`compstore push`, `compstore fetch` and `compstore remote ...`: thin layers over the
`Store` methods of the same names (remote_add, remote_gc, ...)."""

from __future__ import annotations

import click
from tabulate import tabulate

from ..store.progress import want_progress
from ..store.remote import DEFAULT_GRACE_S
from ..store.reports import human
from .common import Group, emit, json_option, open_store


@click.command()
@click.argument("ref")
@click.option("--to", "to", metavar="REMOTE", help="Remote name or URL [default: the only remote].")
@click.option("--as", "as_ref", metavar="NAME", help="Ref name on the remote [default: REF].")
@json_option
@click.pass_context
def push(ctx, ref, to, as_ref, as_json):
    """Upload REF to a remote: only the blobs it lacks, then the ref."""
    r = open_store(ctx).push(ref, to=to, as_ref=as_ref, progress=want_progress(as_json))
    emit(as_json, r.to_dict(),
         f"pushed {r.ref} -> {r.remote} as {r.remote_ref} ({r.status}): uploaded "
         f"{human(r.uploaded_bytes)} in {r.packs_written} pack(s), {human(r.present_bytes)} "
         f"already there, {human(r.metadata_bytes)} metadata ({r.seconds:.2f} s)")


@click.command()
@click.argument("ref")
@click.option("--from", "from_", metavar="REMOTE", help="Remote name or URL [default: the only remote].")
@click.option("--name", help="Local ref name [default: REF].")
@json_option
@click.pass_context
def fetch(ctx, ref, from_, name, as_json):
    """Bring a remote's REF into the store: only the blobs the store lacks, each hash-checked."""
    r = open_store(ctx).fetch(ref, from_=from_, name=name, progress=want_progress(as_json))
    emit(as_json, r.to_dict(),
         f"fetched {r.remote_ref} from {r.remote} as {r.ref} ({r.status}): downloaded "
         f"{human(r.downloaded_bytes)} ({r.blobs_downloaded} blobs), reused "
         f"{human(r.reused_bytes)}, {human(r.metadata_bytes)} metadata ({r.seconds:.2f} s)")


@click.group(cls=Group)
def remote():
    """Remote stores on object storage (s3://, gs://, file://) shared by many nodes."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option, e.g. -o endpoint_url=http://minio:9000 (stored in "
                   "plain text: keep credentials in the environment).")
@json_option
@click.pass_context
def remote_add(ctx, name, url, options, as_json):
    """Remember the remote at URL as NAME."""
    parsed = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{opt!r} is not KEY=VALUE", param_hint="--option")
        parsed[key] = value
    r = open_store(ctx).remote_add(name, url, **parsed)
    emit(as_json, r, f"added remote {name}: {url}")


@remote.command("ls")
@json_option
@click.pass_context
def remote_ls(ctx, as_json):
    """The remotes this store knows."""
    r = open_store(ctx).remotes()
    emit(as_json, r, tabulate([[x["name"], x["url"]] for x in r], ["name", "url"]) if r
         else "no remotes (add one with `compstore remote add NAME URL`)")


@remote.command("rm")
@click.argument("name")
@json_option
@click.pass_context
def remote_rm(ctx, name, as_json):
    """Forget a remote (nothing on it changes)."""
    emit(as_json, open_store(ctx).remote_rm(name), f"removed remote {name}")


@remote.command("refs")
@click.argument("name", required=False)
@json_option
@click.pass_context
def remote_refs(ctx, name, as_json):
    """The refs on a remote."""
    r = open_store(ctx).remote_refs(name)
    emit(as_json, r, tabulate(sorted([k, v[:12]] for k, v in r.items()), ["ref", "snapshot"])
         if r else "no refs")


@remote.command("rm-ref")
@click.argument("name")
@click.argument("ref")
@json_option
@click.pass_context
def remote_rm_ref(ctx, name, ref, as_json):
    """Drop REF on remote NAME (its objects go with `compstore remote gc`)."""
    r = open_store(ctx).remote_rm_ref(ref, remote=name)
    emit(as_json, r, f"removed {ref} from {r['remote']} (snapshot {r['snapshot'][:12]})")


@remote.command("gc")
@click.argument("name", required=False)
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; delete nothing.")
@click.option("--grace", "grace_s", type=float, default=DEFAULT_GRACE_S, show_default=True,
              help="Seconds an unreferenced object is kept (pushes in flight write refs last).")
@json_option
@click.pass_context
def remote_gc(ctx, name, dry_run, grace_s, as_json):
    """Delete the remote's objects that no remote ref reaches."""
    r = open_store(ctx).remote_gc(name, dry_run=dry_run, grace_s=grace_s)
    verb = "would free" if r.dry_run else "freed"
    emit(as_json, r.to_dict(),
         f"{verb} {human(r.freed_bytes)}: {r.packs_removed} packs, {r.snapshots_removed} "
         f"snapshots, {r.locks_removed} stale leases; kept {human(r.kept_young_bytes)} younger "
         f"than the grace, {human(r.kept_in_live_packs_bytes)} dead in live packs "
         f"({r.seconds:.2f} s)")
