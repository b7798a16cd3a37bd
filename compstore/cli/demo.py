"""`compstore demo`: the main job on an embedded default, end to end on CPU.

Builds the tiny A/B/C/D family (compstore.loader.synthetic), ingests it into a
fresh store, shows dedup (du, diff), proves export and verify, then loads
pipelines from the store beside diffusers loading the same folders, switches
A -> B, and checks that both produce the same image; then converts B written as a
single-file checkpoint and loads it as diffusers' `from_single_file` does.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from tabulate import tabulate

from ..store import Store
from ..store.reports import human


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_demo(workdir: Path, echo: Callable[[str], None] | None = print) -> dict:
    import hashlib
    import logging

    import diffusers
    import numpy as np
    import torch
    import transformers

    from ..loader import DiffusionPipeline
    from ..loader.synthetic import build_family

    say = echo or (lambda s: None)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("compstore").setLevel(logging.ERROR)

    if workdir.exists():
        shutil.rmtree(workdir)
    say(f"1. building a tiny family of Stable Diffusion pipelines in {workdir}/family")
    family = build_family(workdir / "family")
    say("   A base | B = A with another UNet | C = A with 1/3 of UNet tensors changed, sharded "
        "| D = A + fp16 variant files")

    store = Store(workdir / "store")
    say(f"\n2. ingesting into {store.home}")
    rows, ingests = [], {}
    for name, folder in family.items():
        r = store.ingest(folder, name)
        ingests[name] = r.to_dict()
        rows.append([name, r.files, r.tensors, human(r.logical_bytes), human(r.written_bytes),
                     human(r.reused_bytes)])
    say(tabulate(rows, ["ref", "files", "tensors", "size", "written", "reused"]))

    du = store.du()
    say(f"\n3. dedup: logical {human(du.logical_bytes)} -> physical {human(du.physical_bytes)} "
        f"({du.dedup_ratio:.2f}x)")
    diffs = {}
    for a, b in (("A", "B"), ("A", "C"), ("A", "D")):
        d = store.diff(a, b)
        diffs[f"{a}->{b}"] = d.to_dict()
        parts = ", ".join(f"{c['slot']}{'.' + c['variant'] if c['variant'] else ''}: {c['status']}"
                          for c in d.components if c["slot"] in ("unet", "vae", "text_encoder"))
        say(f"   {a} -> {b}: delta {human(d.delta_bytes)}, shared {human(d.shared_bytes)} ({parts})")

    say("\n4. export and verify")
    identical = {}
    for name, folder in family.items():
        out = workdir / "export" / name
        store.export(name, out)
        digest = lambda root: {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                               for p in root.rglob("*") if p.is_file()}
        identical[name] = digest(out) == digest(folder)
    v = store.verify()
    say(f"   export byte-identical: {identical}; verify: {'ok' if v.ok else v.problems}")

    say("\n5. loading and switching A -> B on CPU (compstore from the store, diffusers from folders)")
    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np", height=32, width=32).images
    timings, same = {}, {}
    for name in ("A", "B"):
        ours, t_ours = _timed(lambda: DiffusionPipeline.from_pretrained(name, store=store))
        theirs, t_theirs = _timed(lambda: diffusers.DiffusionPipeline.from_pretrained(family[name]))
        timings[name] = {"compstore_s": round(t_ours, 4), "diffusers_s": round(t_theirs, 4)}
        same[name] = bool(np.array_equal(image(ours), image(theirs)))
    say(tabulate([[n, f"{t['compstore_s']*1000:.0f} ms", f"{t['diffusers_s']*1000:.0f} ms", same[n]]
                  for n, t in timings.items()],
                 ["pipeline", "compstore load", "diffusers load", "same image"]))
    say(f"   a switch A -> B has to move {human(diffs['A->B']['delta_bytes'])} (B's UNet); the "
        "VAE and text encoder are the same store tensors")

    say("\n6. a single-file checkpoint: B written in the original (A1111/ComfyUI) layout")
    from ..loader import ingest_single_file, pipeline_class
    from ..loader.synthetic import save_as_single_file

    checkpoint = save_as_single_file(diffusers.StableDiffusionPipeline.from_pretrained(family["B"]),
                                     workdir / "B.safetensors")
    converted = ingest_single_file(checkpoint, "StableDiffusionPipeline", config="A", store=store)
    ours = pipeline_class("StableDiffusionPipeline").from_single_file(checkpoint, config="A", store=store)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(family["A"]))
    single = {**converted.to_dict(), "same_image_as_diffusers": bool(np.array_equal(image(ours), image(theirs)))}
    say(f"   converted by diffusers once and stored: wrote {human(converted.written_bytes)} (its provenance "
        f"file: every tensor is B's), same image as diffusers' from_single_file: "
        f"{single['same_image_as_diffusers']}")

    report = {"store": str(store.home), "ingest": ingests, "du": du.to_dict(), "diff": diffs,
              "export_identical": identical, "verify_ok": v.ok, "load": timings,
              "same_image_as_diffusers": same, "single_file": single}
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    say(f"\nreport: {workdir / 'report.json'}")
    store.close()
    return report
