"""The `compstore` command: a thin click layer over `Store` (and the loader).

Each command calls the library method of the same name, prints a short human
summary, or one JSON document with `--json`. Errors are one line on stderr and a
non-zero exit; the store is left as it was.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from tabulate import tabulate

from ..store.catalog import REBUILD_ADVICE
from ..store.progress import want_progress
from ..store.reports import human
from .common import Group, emit, json_option, open_store
from .bench import bench
from .remote import fetch, push, remote


@click.group(cls=Group)
@click.option("--store", "store_dir", type=click.Path(file_okay=False), envvar="COMPSTORE_HOME",
              help="Store folder [default: $COMPSTORE_HOME or ~/.cache/compstore].")
@click.version_option(package_name="compstore")
@click.pass_context
def cli(ctx: click.Context, store_dir: str | None) -> None:
    """compstore: a content-addressed store for diffusion pipeline weights."""
    ctx.obj = store_dir


@cli.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--name", help="Ref to record it under [default: the folder's name].")
@click.option("--allow-pickle", is_flag=True,
              help="Store pickle checkpoints (.bin/.ckpt/.pt) as opaque bytes; never loaded.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out matching files.")
@click.option("--repin", is_flag=True,
              help="Modular pipelines: accept new content at sources pinned earlier.")
@json_option
@click.pass_context
def ingest(ctx, path, name, allow_pickle, exclude, repin, as_json):
    """Ingest a pipeline folder or a single component folder."""
    r = open_store(ctx).ingest(path, name, allow_pickle=allow_pickle, exclude=list(exclude),
                               repin=repin, progress=want_progress(as_json))
    if r.status == "unchanged" and not r.written_bytes:
        text = f"{r.ref}: unchanged, the store already holds this exact content (nothing written)"
    else:
        text = (f"{r.ref}: {r.status} ({r.kind}), {r.files} files, {r.tensors} tensors, "
                f"{r.components} components, {human(r.logical_bytes)}; wrote "
                f"{human(r.written_bytes)} new, reused {human(r.reused_bytes)} in {r.seconds:.2f} s")
    if r.healed_bytes:
        text += f"; healed {human(r.healed_bytes)} of damaged payloads"
    emit(as_json, r.to_dict(), text)


@cli.command("ingest-single-file")
@click.argument("path")
@click.option("--class", "pipeline_class", required=True, metavar="CLASS",
              help="The diffusers pipeline class the checkpoint is for, e.g. StableDiffusionXLPipeline, "
                   "or a model class (AutoencoderKL) for a model's checkpoint.")
@click.option("--config", help="Its configs, tokenizers, scheduler: a store ref, a diffusers pipeline "
              "folder or a Hub repo id [default: the repo diffusers infers from the checkpoint].")
@click.option("--subfolder", help="A model class's folder in --config, e.g. vae [default with no "
              "--config: the class's, as diffusers'].")
@click.option("--name", help="Ref to record it under [default: the file's absolute path].")
@click.option("--may-lack", multiple=True, metavar="SLOT",
              help="A pipeline slot the checkpoint may lack, its model loaded from elsewhere "
                   "(e.g. text_encoder_3): converted without it where the file lacks it.")
@click.option("--bfl", is_flag=True, help="A model's file quantized in Black Forest Labs' fp8r or nvfp4 "
              "layout (diffusers' BFLQuantizationConfig): converted with its quantizer.")
@json_option
@click.pass_context
def ingest_single_file(ctx, path, pipeline_class, config, subfolder, name, may_lack, bfl, as_json):
    """Convert a single-file checkpoint (.safetensors, a model's .gguf, or a Hub URL of one) with
    diffusers, once, and ingest the pipeline (or model)."""
    from ..loader import ingest_single_file as convert_and_ingest

    quantization = None
    if bfl:
        from diffusers import BFLQuantizationConfig

        quantization = BFLQuantizationConfig()
    r = convert_and_ingest(path, pipeline_class, config=config, subfolder=subfolder, name=name,
                           may_lack=may_lack, quantization_config=quantization, store=open_store(ctx))
    text = (f"{r.ref}: unchanged, the store holds this file's conversion (sha256 {r.sha256[:12]})"
            if r.status == "unchanged" else
            f"{r.ref}: converted with config {r.config}; wrote {human(r.written_bytes)} new, "
            f"reused {human(r.reused_bytes)} in {r.seconds:.2f} s")
    emit(as_json, r.to_dict(), text)


@cli.command()
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit [default: main].")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Pull only matching files, from every folder of the repo.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave matching files out, e.g. 'safety_checker/*'.")
@click.option("--variant", help="Weights variant, e.g. fp16: the default weights in folders "
              "without it; refused when no folder has it.")
@click.option("--all", "all_files", is_flag=True,
              help="The repo as published: every variant, every folder, single-file checkpoints "
                   "(never pickles). Default: what from_pretrained loads.")
@click.option("--name", help="Ref to record it under [default: REPO_ID@COMMIT and REPO_ID, "
              "each followed by [V] with --variant V].")
@click.option("--repin", is_flag=True,
              help="Modular repos: accept new content at the repos its components point at.")
@json_option
@click.pass_context
def pull(ctx, repo_id, revision, include, exclude, variant, all_files, name, repin, as_json):
    """Pull a Hub repo, downloading only what the store lacks (whole files; Xet chunks)."""
    r = open_store(ctx).pull(repo_id, revision=revision, include=list(include) or None,
                             exclude=list(exclude) or None,
                             variant=variant, name=name, repin=repin, all_files=all_files,
                             progress=want_progress(as_json))
    emit(as_json, r.to_dict(),
         f"{r.ref}: {r.status}; downloaded {r.downloaded_files} files ({human(r.downloaded_bytes)}), "
         f"skipped {r.skipped_files} already held ({human(r.skipped_bytes)}) in {r.seconds:.2f} s"
         + (f"\n  Xet: {r.xet_files} files, fetched {human(r.chunk_fetched_bytes)}, reused "
            f"{human(r.chunk_reused_bytes)} from the store's chunks (dedup {r.chunk_dedup_ratio:.0%});"
            f" plain HTTP: {r.http_files} files" if r.xet_files else ""))


@cli.command("xet-index")
@click.argument("ref")
@json_option
@click.pass_context
def xet_index(ctx, ref, as_json):
    """Index the Xet chunks of REF's files pulled over HTTP or adopted, so that pulls
    of related repos fetch only the chunks the store lacks."""
    r = open_store(ctx).xet_index(ref)
    emit(as_json, r, f"{ref}: indexed {r['files_indexed']} of {r['files']} files "
                     f"({r['chunks']} chunks) in {r['seconds']:.2f} s")


@cli.command()
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="compstore.manifest.json",
              show_default=True, help="Where to write it ('-' for stdout).")
@json_option
@click.pass_context
def manifest(ctx, ref, output, as_json):
    """Write REF's tensor manifest, for publishers: pulls then fetch only missing tensors."""
    doc = open_store(ctx).manifest(ref)
    text = json.dumps(doc, separators=(",", ":"))
    if output == "-":
        click.echo(text)
        return
    Path(output).write_text(text)
    summary = {"output": output, "files": len(doc["files"]), "bytes": len(text)}
    emit(as_json, summary, f"wrote {output}: {summary['files']} files, {human(len(text))}")


@cli.command()
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Hugging Face cache [default: huggingface_hub's, e.g. ~/.cache/huggingface/hub].")
@click.option("--reclaim", is_flag=True,
              help="Delete each adopted revision from the cache once the store rebuilds it "
                   "byte-identically.")
@json_option
@click.pass_context
def adopt(ctx, cache_dir, reclaim, as_json):
    """Ingest every diffusers snapshot (and single-file checkpoint) of a Hugging Face cache."""
    r = open_store(ctx).adopt(cache_dir, reclaim=reclaim, progress=want_progress(as_json))
    rows = [[a["ref"], a["status"], "whole" if a["whole"] else "single files" if a["single_files"] else "part",
             human(a["bytes"])]
            + ([a["verified"]] if reclaim else []) for a in r.adopted]
    text = (tabulate(rows, ["ref", "status", "pipeline", "size"] + (["verified"] if reclaim else []))
            if rows else "(no diffusers snapshots found)")
    damaged = [k for k in r.skipped if not k["reason"].startswith("not a diffusers")]
    text += f"\n\n{len(r.skipped)} other revisions skipped"
    text += "".join(f"\n  {k['repo']}@{k['commit'] or '?'}: {k['reason']}" for k in damaged)
    if reclaim:
        text += f"; reclaimed {human(r.reclaimed_bytes)} from {r.cache_dir}"
    emit(as_json, r.to_dict(), text)


@cli.command("ls")
@json_option
@click.pass_context
def ls_cmd(ctx, as_json):
    """List refs."""
    refs = open_store(ctx).ls()
    rows = [[r["name"], r["kind"], r["files"], human(r["logical_bytes"]), r["snapshot_id"][:12],
             r["updated"]] for r in refs]
    emit(as_json, refs, tabulate(rows, ["ref", "kind", "files", "size", "snapshot", "updated"])
         if rows else "(no refs)")


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def show(ctx, ref, as_json):
    """Show a ref's components, their ids and sizes, and where each is shared."""
    info = open_store(ctx).show(ref)
    rows = [[c["slot"] or ".", c["variant"] or "-",
             c["class_name"] + (f" ({c['quant_method']})" if c["quant_method"] else ""),  # saved quantized
             c["id"][:12], c["n_tensors"], human(c["tensor_bytes"]), ", ".join(c["shared_with"]) or "-"]
            for c in info["components"]]
    text = (f"{info['name']} -> snapshot {info['snapshot_id'][:12]} ({info['kind']}, "
            f"{info['files']} files, {human(info['logical_bytes'])}) from {info['source']}\n"
            + tabulate(rows, ["slot", "variant", "class", "component", "tensors", "bytes",
                              "shared with"]))
    if info["pins"]:
        pins = [[p["slot"], p["source"] + (f"/{p['subfolder']}" if p["subfolder"] else ""),
                 p["revision"] or "-", p["variant"] or "-", p["component_id"][:12]]
                for p in info["pins"]]
        text += "\n\npinned (modular entries resolved at ingest)\n" + tabulate(
            pins, ["slot", "source", "revision", "variant", "component"])
    emit(as_json, info, text)


@cli.command()
@json_option
@click.pass_context
def du(ctx, as_json):
    """Disk usage: logical vs physical bytes, dedup ratio, bytes only each ref holds."""
    r = open_store(ctx).du()
    rows = [[x["name"], human(x["logical_bytes"]), human(x["unique_bytes"])] for x in r.refs]
    text = (tabulate(rows, ["ref", "logical", "unique"]) + "\n\n"
            f"logical  {human(r.logical_bytes)}\nphysical {human(r.physical_bytes)} "
            f"(+ catalog {human(r.catalog_bytes)})\ndedup    {r.dedup_ratio:.2f}x")
    emit(as_json, r.to_dict(), text)


@cli.command()
@click.argument("a")
@click.argument("b")
@json_option
@click.pass_context
def diff(ctx, a, b, as_json):
    """What B shares with A, per component; delta = tensor bytes of B that A lacks."""
    r = open_store(ctx).diff(a, b)
    rows = [[c["slot"] or ".", c["variant"] or "-", c["status"], human(c["shared_bytes"]),
             human(c["delta_bytes"])] for c in r.components]
    text = (tabulate(rows, ["slot", "variant", "status", "shared", "delta"]) +
            f"\n\nshared {human(r.shared_bytes)}, delta {human(r.delta_bytes)} ({a} -> {b})")
    emit(as_json, r.to_dict(), text)


@cli.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--flatten", is_flag=True,
              help="Modular pipelines: copy pinned components in, index pointing at DEST.")
@json_option
@click.pass_context
def export(ctx, ref, dest, flatten, as_json):
    """Rebuild REF's original files in DEST, byte-for-byte."""
    r = open_store(ctx).export(ref, dest, flatten=flatten, progress=want_progress(as_json))
    emit(as_json, r.to_dict(), f"exported {r.ref}: {r.files} files, {human(r.bytes)} to {r.dest}")


@cli.command()
@json_option
@click.pass_context
def verify(ctx, as_json):
    """Re-hash every stored payload; exit 1 and name the refs on any problem."""
    store = open_store(ctx)
    r = store.verify(progress=want_progress(as_json))
    lines = [f"checked {r.blobs_checked} blobs, {human(r.bytes_checked)} in {r.seconds:.2f} s: "
             + ("ok" if r.ok else f"{len(r.problems) + len(r.catalog_problems)} problem(s)")]
    for problem in r.catalog_problems:
        lines.append(f"  catalog.db: {problem}")
    for p in r.problems:
        lines.append(f"  blob {p['blob']} in pack {p['pack']}: {p['problem']}; refs: "
                     f"{', '.join(p['refs']) or '-'}; files: {', '.join(p['files']) or '-'}")
    if r.problems and not r.recorded and not store.read_only and not r.catalog_problems:
        lines.append("  (not recorded: another process was writing to the store; run verify "
                     "again before ingesting a source under its own ref to heal it)")
    emit(as_json, r.to_dict(), "\n".join(lines))
    if r.catalog_problems:
        if not as_json:
            click.echo(f"Error: the store's catalog is damaged: {REBUILD_ADVICE}", err=True)
        sys.exit(1)
    if not r.ok:
        if not as_json:
            click.echo("Error: the store has corrupt or missing payloads (refs listed above); "
                       "ingest or pull their sources again (or fetch them from a remote) to heal "
                       "them, or `compstore rm` those refs and `compstore gc`", err=True)
        sys.exit(1)


@cli.command("backup-catalog")
@click.argument("dest", type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def backup_catalog(ctx, dest, as_json):
    """Copy the catalog (the only record of what the packs hold) to the new file DEST,
    consistently while the store is in use; `restore-catalog` puts it back."""
    r = open_store(ctx).backup_catalog(dest)
    emit(as_json, r.to_dict(), f"backed up the catalog ({r.refs} refs, {human(r.bytes)}) to {r.path}")


@cli.command("restore-catalog")
@click.argument("backup", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace a whole catalog too (what was stored since is dropped).")
@json_option
@click.pass_context
def restore_catalog(ctx, backup, force, as_json):
    """Make BACKUP (from `backup-catalog`) the store's catalog, replacing a lost or
    damaged one; then run `compstore verify`."""
    from ..store import restore_catalog as restore

    r = restore(backup, ctx.obj, force=force)
    lines = [f"restored the catalog of {r.home} from {backup}: {r.refs} refs"]
    if r.missing_packs:
        lines.append(f"  {r.missing_packs} packs it names are gone (removed since the backup): "
                     "`compstore verify` names the refs they held")
    if r.unnamed_packs:
        lines.append(f"  {r.unnamed_packs} packs on disk it does not name (written since the backup): "
                     "the next ingest or gc removes them; ingest or pull what they held again")
    emit(as_json, r.to_dict(), "\n".join(lines))


@cli.command()
@click.option("--dry-run", is_flag=True, help="Report what would be freed; change nothing.")
@json_option
@click.pass_context
def gc(ctx, dry_run, as_json):
    """Remove payloads no ref reaches and compact packs."""
    r = open_store(ctx).gc(dry_run=dry_run)
    verb = "would free" if r.dry_run else "freed"
    emit(as_json, r.to_dict(),
         f"{verb} {human(r.freed_bytes)}: {r.objects_removed} objects, {r.snapshots_removed} "
         f"snapshots, {r.packs_removed} packs removed, {r.packs_compacted} compacted "
         f"({r.seconds:.2f} s)" + (f"; and {human(r.downloads_freed_bytes)} that failed pulls "
                                   "left in downloads/" if r.downloads_freed_bytes else ""))


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def rm(ctx, ref, as_json):
    """Drop a ref (its bytes come back with `compstore gc`)."""
    r = open_store(ctx).rm(ref)
    emit(as_json, r, f"removed ref {r['removed']} (snapshot {r['snapshot'][:12]})")


@cli.command()
@click.argument("name")
@click.argument("target")
@click.option("--force", is_flag=True, help="Move NAME if it already names another snapshot.")
@json_option
@click.pass_context
def tag(ctx, name, target, force, as_json):
    """Name TARGET (a ref, or a snapshot id) NAME too: a name of your own to load, kept
    where it is as later pulls move the repo's ref."""
    r = open_store(ctx).tag(name, target, force=force)
    moved = f" (was {r['moved_from'][:12]})" if r["moved_from"] else ""
    emit(as_json, r, f"{r['ref']} -> snapshot {r['snapshot'][:12]}{moved}")


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Where the demo builds its pipelines and its store.")
@json_option
def demo(workdir, as_json):
    """Build a tiny family of pipelines, ingest it, show dedup, switch, report."""
    from .demo import run_demo

    report = run_demo(Path(workdir), echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))


cli.add_command(push)
cli.add_command(fetch)
cli.add_command(remote)
cli.add_command(bench)


def main() -> None:
    cli(prog_name="compstore")
