"""Bytes the Hub serves for a pull vs bytes the store lacked, on the emulated Hub.

    python benchmarks/pull.py

Serves the tiny A/B/C/D family from tests/hub_emulator.py on 127.0.0.1 and pulls
A, B, C, D in that order into one store, as published (`--all`: D's fp16 files
too). Then a repo published with more than its pipeline (D with a single-file
checkpoint and a LoRA at its root, a VAE folder its model_index.json does not
name, an OpenVINO file, a README, a sample image: `hub_emulator.publish_with_extras`):
what a default pull fetches beside what diffusers' own `from_pretrained`
downloads and the whole repo; and part of it (`load_component(..., "vae")`,
`from_pretrained(..., unet=unet)`) beside diffusers' `subfolder=` and passed-in
downloads. Then publishes C with a compstore
manifest and pulls it into a store that holds only A. Prints, per pull, what the
store lacked (whole files by sha256; tensors by the catalog's diff) beside what
the emulator served. Last, the Xet path: a 64 MB UNet and a partial fine-tune of
it (a third of its large tensors changed) published as two Xet repos; the
fine-tune is pulled after the base and the CAS's xorb bytes are compared with the
changed tensor bytes and with the bytes of the chunks the base does not share.
Last, a far Hub: every file request answered after 50 ms, org/A pulled over HTTP
into empty stores one file at a time and $COMPSTORE_PULL_WORKERS (8) at a time,
then three pulls of it started at once into one store (they take turns), and a
pull of a repo that shares no weights with org/A, alone and while a pull of
org/A downloads a large file into the same store (it does not wait for it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import huggingface_hub.constants  # noqa: E402

from compstore import Store  # noqa: E402
from compstore.loader.synthetic import build_family  # noqa: E402
from hub_emulator import HubEmulator, huggingface_hub_default_endpoint, publish_with_extras  # noqa: E402
from xet_cas import chunk_boundaries, chunk_hash  # noqa: E402


def main() -> None:
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    work = Path(tempfile.mkdtemp(prefix="compstore-pull-"))
    family = build_family(work / "family")
    hub = HubEmulator()
    os.environ["HF_ENDPOINT"] = hub.url
    for name, folder in family.items():
        hub.add_repo(f"org/{name}", folder)

    print("whole-file pulls of the repos as published (--all), in order, into one store")
    store, seen = Store(work / "store"), set()
    for name, folder in family.items():
        files = [p.read_bytes() for p in folder.rglob("*") if p.is_file()]
        lacked = sum(len(b) for b in files if hashlib.sha256(b).hexdigest() not in seen)
        seen |= {hashlib.sha256(b).hexdigest() for b in files}
        hub.reset_counts()
        r = store.pull(f"org/{name}", all_files=True)
        print(f"  org/{name}: repo {sum(map(len, files)):>9,} B  store lacked {lacked:>9,} B  "
              f"Hub served {hub.served_bytes:>9,} B  files downloaded {r.downloaded_files}, "
              f"skipped {r.skipped_files}")

    published_repo(hub, work, family)

    with Store(work / "publisher") as pub:
        pub.ingest(family["A"], "A")
        pub.ingest(family["C"], "C")
        delta = pub.diff("A", "C").delta_bytes
        published = work / "C-with-manifest"
        shutil.copytree(family["C"], published)
        (published / "compstore.manifest.json").write_text(json.dumps(pub.manifest("C")))
    hub.add_repo("org/C-m", published)
    with Store(work / "consumer") as consumer:
        consumer.pull("org/A")
        hub.reset_counts()
        consumer.pull("org/C-m")
    print("tensor-level pull with a manifest: org/C-m into a store holding org/A")
    print(f"  C's new tensor bytes {delta:,} B; manifest "
          f"{(published / 'compstore.manifest.json').stat().st_size:,} B; Hub served "
          f"{hub.served_bytes:,} B (the rest: new safetensors headers and index files)")
    xet_partial_finetune(hub, work)
    far_hub(hub, work, family["A"])
    hub.close()
    shutil.rmtree(work, ignore_errors=True)


def published_repo(hub: HubEmulator, work: Path, family: dict[str, Path]) -> None:
    import diffusers

    repo = publish_with_extras(family, work / "X")
    hub.add_repo("org/X", repo)
    size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    print(f"org/X: D with a published repo's extras (a single-file checkpoint, a LoRA, an unnamed "
          f"VAE folder, an OpenVINO file, a README, a sample image), {size:,} B as published")
    for variant in (None, "fp16"):
        with huggingface_hub_default_endpoint(hub.url):
            theirs = Path(diffusers.DiffusionPipeline.download("org/X", variant=variant,
                                                               cache_dir=str(work / f"hf-{variant}")))
        theirs_bytes = sum(p.stat().st_size for p in theirs.rglob("*") if p.is_file())
        with Store(work / f"X-{variant}") as store:
            hub.reset_counts()
            store.pull("org/X", variant=variant)
        print(f"  variant={variant}: compstore pull fetched {hub.served_bytes:,} B; diffusers' "
              f"from_pretrained downloads {theirs_bytes:,} B")
    with Store(work / "X-all") as store:
        hub.reset_counts()
        store.pull("org/X", all_files=True)
    print(f"  --all: compstore pull fetched {hub.served_bytes:,} B (never the OpenVINO file)")
    part_of_a_pipeline(hub, work)


def part_of_a_pipeline(hub: HubEmulator, work: Path) -> None:
    """One model of org/X (`load_component(..., "vae")`), and the pipeline with its
    UNet passed in, each into an empty store, beside what diffusers downloads for
    the same calls."""
    import compstore
    import diffusers

    def hf_bytes(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())

    with huggingface_hub_default_endpoint(hub.url):
        diffusers.AutoencoderKL.from_pretrained("org/X", subfolder="vae", cache_dir=str(work / "hf-vae"))
        unet = diffusers.UNet2DConditionModel.from_pretrained("org/X", subfolder="unet",
                                                              cache_dir=str(work / "hf-unet"))
        diffusers.DiffusionPipeline.from_pretrained("org/X", unet=unet, cache_dir=str(work / "hf-nounet"))
    with Store(work / "X-vae") as store:
        hub.reset_counts()
        compstore.load_component("org/X", "vae", store=store)
        vae = hub.served_bytes
    with Store(work / "X-nounet") as store:
        hub.reset_counts()
        compstore.DiffusionPipeline.from_pretrained("org/X", unet=unet, store=store)
        no_unet = hub.served_bytes
    print(f"  load_component(\"org/X\", \"vae\"): compstore fetched {vae:,} B; diffusers' "
          f"subfolder=\"vae\" downloads {hf_bytes(work / 'hf-vae'):,} B")
    print(f"  from_pretrained(\"org/X\", unet=unet): compstore fetched {no_unet:,} B; diffusers "
          f"downloads {hf_bytes(work / 'hf-nounet'):,} B")


def xet_partial_finetune(hub: HubEmulator, work: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(128, 256), layers_per_block=1, cross_attention_dim=256,
        norm_num_groups=32, sample_size=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(work / "xet-base")
    changed = 0
    with torch.no_grad():
        for p in [p for _, p in sorted(unet.named_parameters()) if p.numel() * 4 >= 256 << 10][::3]:
            p.add_(0.01)
            changed += p.numel() * 4
    unet.save_pretrained(work / "xet-ft")
    hub.add_repo("org/xet-base", work / "xet-base", xet=True)
    hub.add_repo("org/xet-ft", work / "xet-ft", xet=True)

    def chunks(folder: Path) -> dict:
        data, out, start = (folder / "diffusion_pytorch_model.safetensors").read_bytes(), {}, 0
        for end in chunk_boundaries(data):
            out[chunk_hash(data[start:end])] = end - start
            start = end
        return out

    base, ft = chunks(work / "xet-base"), chunks(work / "xet-ft")
    new_chunks = sum(n for h, n in ft.items() if h not in base)
    with Store(work / "xet-store") as store:
        store.pull("org/xet-base")
        hub.reset_counts()
        r = store.pull("org/xet-ft")
    size = sum(ft.values())
    print("Xet chunk-level pull: org/xet-ft (a third of the large tensors changed) after org/xet-base")
    print(f"  UNet file {size:,} B; changed tensors {changed:,} B; chunks the base lacks "
          f"{new_chunks:,} B; CAS served {hub.xet_served_bytes:,} B = "
          f"{hub.xet_served_bytes / changed:.3f}x the changed tensors, "
          f"{hub.xet_served_bytes / new_chunks:.3f}x the new chunks; reused from the store "
          f"{r.chunk_reused_bytes:,} B (dedup {r.chunk_dedup_ratio:.1%}); Hub served "
          f"{hub.served_bytes:,} B over plain HTTP")


def far_hub(hub: HubEmulator, work: Path, folder: Path, latency: float = 0.05) -> None:
    from compstore.store.hub import PULL_WORKERS

    files = sum(1 for p in folder.rglob("*") if p.is_file())
    hub.latency, seconds = latency, {}
    for workers in (1, PULL_WORKERS, 1, PULL_WORKERS):  # alternated: the faster of two each
        os.environ["COMPSTORE_PULL_WORKERS"] = str(workers)
        with Store(work / f"far-{workers}") as store:
            r = store.pull("org/A")
            assert r.http_files == files
            seconds[workers] = min(seconds.get(workers, float("inf")), r.seconds)
        shutil.rmtree(work / f"far-{workers}")
    del os.environ["COMPSTORE_PULL_WORKERS"]
    hub.reset_counts()
    with ThreadPoolExecutor(3) as pool:  # three workers of a service, each with its own Store
        statuses = list(pool.map(lambda i: _pull_alone(work / "far-together", "org/A"), range(3)))
    together = hub.served_bytes
    hub.latency = 0.0
    print(f"a far Hub ({latency * 1000:.0f} ms per file request): org/A, {files} files over HTTP")
    print(f"  1 at a time {seconds[1]:.2f} s; {PULL_WORKERS} at a time {seconds[PULL_WORKERS]:.2f} s "
          f"({seconds[1] / seconds[PULL_WORKERS]:.1f}x faster)")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"  3 pulls of org/A started at once into one store: {sorted(statuses)}; Hub served "
          f"{together:,} B = {together / size:.2f}x the repo")
    beside_a_large_pull(hub, work, latency)


def beside_a_large_pull(hub: HubEmulator, work: Path, latency: float, held_s: float = 2.0) -> None:
    """org/U (other weights than org/A, the same configs) pulled alone, then while a
    pull of org/A downloads a large file (its UNet GET held up `held_s`), each pull
    with its own Store, as two processes would."""
    import threading

    from compstore.loader.synthetic import tiny_sd_pipeline

    tiny_sd_pipeline(7).save_pretrained(work / "U")
    hub.add_repo("org/U", work / "U")
    hub.latency = latency
    t0 = time.perf_counter()
    _pull_alone(work / "U-alone", "org/U")
    alone = time.perf_counter() - t0
    gate = hub.gates["org/A", "unet/diffusion_pytorch_model.safetensors"] = threading.Event()
    timer = threading.Timer(held_s, gate.set)
    big = threading.Thread(target=_pull_alone, args=(work / "beside", "org/A"))
    timer.start()
    big.start()
    while hub.in_flight == 0:
        time.sleep(0.005)
    t0 = time.perf_counter()
    _pull_alone(work / "beside", "org/U")
    beside = time.perf_counter() - t0
    big.join()
    del hub.gates["org/A", "unet/diffusion_pytorch_model.safetensors"]
    hub.latency = 0.0
    print(f"  org/U (no weights in common with org/A) alone: {alone:.2f} s; while a pull of org/A "
          f"into the same store downloads a large file ({held_s:.0f} s): {beside:.2f} s")


def _pull_alone(home: Path, repo: str) -> str:
    with Store(home) as store:
        return store.pull(repo).status


if __name__ == "__main__":
    main()
