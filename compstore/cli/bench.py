"""`compstore bench ...`: the benchmarks that ship with the library."""

from __future__ import annotations

import json

import click

from .common import Group, json_option


@click.group(cls=Group)
def bench():
    """Benchmarks (reports with figures measured side by side in one run)."""


@bench.command("switch")
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="tiny: a few MB per pipeline (CPU); full: published SDXL / FLUX.1-dev shapes.")
@click.option("--family", "families", multiple=True, type=click.Choice(["sdxl", "flux"]),
              help="Families to run [default: sdxl and flux].")
@click.option("--device", help="Target device [default: cuda if available, else cpu].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Weights dtype [default: float16 on cuda, float32 on cpu].")
@click.option("--repeat", type=int, default=3, show_default=True, help="Timed runs per system.")
@click.option("--out", type=click.Path(file_okay=False), default="switch-report", show_default=True,
              help="Where report.json, report.md and switch.png go.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where the families and stores are built [default: the temp dir].")
@click.option("--keep", is_flag=True,
              help="Keep the built families and stores in the workdir and reuse them next time.")
@click.option("--build-only", is_flag=True,
              help="Only build the families into the workdir, as --keep keeps them; time nothing.")
@json_option
def switch(size, families, device, dtype, repeat, out, workdir, keep, build_only, as_json):
    """Time A -> B switches: diffusers naive/expert, compstore, the hardware floor.

    The report files are written again after each system, so a run stopped
    midway leaves the figures it took."""
    from ..loader.switch_bench import build_switch_families, markdown, run_switch_bench

    families = tuple(families) or ("sdxl", "flux")
    echo = (lambda s: None) if as_json else (lambda s: click.echo(s, err=True))
    if build_only:
        built = build_switch_families(size=size, families=families, device=device, dtype=dtype,
                                      workdir=workdir, echo=echo)
        click.echo(json.dumps(built, indent=2) if as_json else
                   "\n".join(f"{f} {name}: {folder}" for f, names in built.items()
                             for name, folder in names.items()))
        return
    report = run_switch_bench(size=size, families=families, device=device, dtype=dtype,
                              repeat=repeat, out=out, workdir=workdir, keep=keep, echo=echo)
    click.echo(json.dumps(report, indent=2) if as_json else
               markdown(report) + f"\n(report.json, report.md, switch.png in {out})")
