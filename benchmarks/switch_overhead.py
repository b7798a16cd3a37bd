"""The CPU side of a compstore switch at the published SDXL shapes, on any machine.

    python benchmarks/switch_overhead.py [--workdir DIR] [--repeat 5] [--keep] [--link-gbps G]

Everything a switch does except copying bytes: resolving the ref, building or
cloning the four models, binding their tensors, the pool's decision for each of
~2,500 tensors, the tokenizers (published vocabulary size), the scheduler and
the pipeline object. The pool's target is the `meta` device, where an upload
copies nothing, so these figures are the part of a GPU switch that no GPU makes
faster; `compstore bench switch --size full --device cuda` measures the whole.

After each timed load the script makes 300,000 small objects, as the caller's
next work would, and prints the seconds Python's cyclic collector ran meanwhile
("collector after"): the part of a load's cost that lands after it returns.

`--link-gbps G` makes each upload take as long as a G GB/s host-to-device copy
would (the host sleeps, the GIL released, where it would wait for the real
uploader's copies): how much of that time the Python work of a switch hides,
with each switch's floor (the bytes it uploads at G GB/s) printed beside it. An
emulation of the overlap, not a GPU measurement.

The weights are zeros with each tensor's index written into its first elements:
every tensor distinct (nothing deduplicates that would not in a real pair) and
cheap to write. Needs ~27 GB of disk under --workdir (two pipeline folders and
the store), and a few minutes to write them; `--keep` keeps them in
<workdir>/switch-overhead and reuses them on the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        w = torch.zeros(t.shape, dtype=torch.float16 if t.is_floating_point() else t.dtype)
        flat = w.view(-1)
        flat[: min(3, flat.numel())] = torch.tensor([i % 1024, i // 1024, seed])[: flat.numel()].to(w.dtype)
        out[name] = w
    return out


def write_pair(root: Path) -> dict[str, Path]:
    """SDXL-shaped A and B (B: A's VAE and text encoders, another UNet) as diffusers folders."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from compstore.loader import synthetic

    tiny = synthetic.switch_family("sdxl", "tiny", root / "tiny")  # model_index, scheduler
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel(**synthetic.SDXL_UNET),
            "vae": AutoencoderKL(**synthetic.SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**synthetic.SD15_CLIP)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**synthetic.SDXL_CLIP_G)),
        }
    out = {}
    for name, unet_seed in (("A", 0), ("B", 1)):
        folder = out[name] = root / name
        shutil.copytree(tiny["A"], folder)
        for slot, model in models.items():
            shutil.rmtree(folder / slot)
            (folder / slot).mkdir()
            seed = unet_seed if slot == "unet" else 0
            if slot in ("unet", "vae"):
                model.save_config(folder / slot)
                save_file(_weights(model, seed), folder / slot / "diffusion_pytorch_model.safetensors")
            else:
                model.config.save_pretrained(folder / slot)
                save_file(_weights(model, seed), folder / slot / "model.safetensors")
        for tok in ("tokenizer", "tokenizer_2"):
            shutil.rmtree(folder / tok)
            synthetic.write_tiny_clip_tokenizer(folder / tok, synthetic.CLIP_VOCAB,
                                                pad_token="!" if tok == "tokenizer_2" else "<|endoftext|>")
    shutil.rmtree(root / "tiny")
    return out


class Link:
    """A pool uploader onto `meta` that takes as long as a `gbps` GB/s link would
    (no time for 0): a batch's copies end bytes / rate after the link is free, and
    the host waits for them only where it would wait for the real uploader's."""

    def __init__(self, gbps: float):
        self.bytes_per_s, self.free_at = gbps * 1e9, 0.0

    def upload(self, srcs: list[torch.Tensor], *, wait: bool = True) -> list[torch.Tensor]:
        if self.bytes_per_s:
            start = max(time.perf_counter(), self.free_at)
            self.free_at = start + sum(t.numel() * t.element_size() for t in srcs) / self.bytes_per_s
        out = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in srcs]
        if wait:
            self.wait()
        return out

    def wait(self) -> None:
        time.sleep(max(0.0, self.free_at - time.perf_counter()))

    def order_after_running(self) -> None:
        pass


AFTER_ALLOCS = 300_000  # the caller's work after a load: this many small objects, kept


def collector_after() -> float:
    """Seconds Python's cyclic collector runs while the caller makes `AFTER_ALLOCS`
    small objects right after a load: what the load's own objects cost the work
    that follows it (young collections examining them, a full collection that
    their count triggers)."""
    spent = []

    def clock(phase, info):
        if phase == "start":
            clock.start = time.perf_counter()
        else:
            spent.append(time.perf_counter() - clock.start)

    gc.callbacks.append(clock)
    try:
        kept = [{"i": i} for i in range(AFTER_ALLOCS)]
    finally:
        gc.callbacks.remove(clock)
    del kept
    return sum(spent)


def open_pair(work: Path):
    """The store of the A/B pair under `work`, written and ingested unless already there."""
    from compstore import Store

    if (work / "store").is_dir():
        store = Store(work / "store")
        if store.has_ref("A") and store.has_ref("B"):
            return store
        store.close()
    shutil.rmtree(work, ignore_errors=True)  # an earlier run stopped midway
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    store = Store(work / "store")
    for name, folder in write_pair(work).items():
        store.ingest(folder, name)
    print(f"wrote and ingested A and B in {time.perf_counter() - t0:.0f} s")
    return store


def main() -> None:
    import compstore
    from compstore import ResidencyPool
    from compstore.loader.warm import clear_caches

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", action="store_true",
                    help="keep the pair and its store in <workdir>/switch-overhead, reuse them next time")
    ap.add_argument("--link-gbps", type=float, default=0.0,
                    help="uploads take as long as a copy at this many GB/s would (default: no time)")
    args = ap.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.workdir or tempfile.gettempdir()) / "switch-overhead"
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compstore-overhead-",
                                                                        dir=args.workdir)))
        store = open_pair(work)
        stack.callback(store.close)
        print(f"delta A->B {store.diff('A', 'B').delta_bytes:,} B")

        def pool(budget_bytes=1 << 62):
            return ResidencyPool("meta", budget_bytes=budget_bytes, pinned_budget_bytes=1 << 62,
                                 uploader=Link(args.link_gbps),
                                 offloader=lambda hosts, tensors: None)  # meta: no bytes to copy back

        def load(ref, p):
            t = time.perf_counter()
            pipe = compstore.DiffusionPipeline.from_pretrained(ref, store=store, dtype=torch.float16,
                                                               pool=p)
            return pipe, time.perf_counter() - t

        def timed(ref, p):  # (seconds, bytes uploaded, collector seconds after) of one load
            pipe, seconds = load(ref, p)
            return seconds, p.last_report.bytes_uploaded, collector_after()

        # Each timed load starts from a collected heap, as switch_bench's runs do: a
        # full collection of earlier runs' garbage (~0.3 s here) is not the load's cost.
        def cold():
            clear_caches()
            gc.collect()
            return timed("A", pool())

        def first_b():  # A resident; B's UNet never built in this process
            clear_caches()
            p = pool()
            a, _ = load("A", p)
            gc.collect()
            return timed("B", p)

        def pinned():  # A resident; B's own tensors evicted to the pinned tier
            clear_caches()
            p = pool(budget_bytes=0)
            b, _ = load("B", p)
            del b
            gc.collect()
            a, _ = load("A", p)  # B's idle tensors go to the pinned tier
            gc.collect()
            return timed("B", p)

        def resident():  # A -> B -> A: the second switch
            clear_caches()
            p = pool()
            a, _ = load("A", p)
            b, _ = load("B", p)
            del a
            gc.collect()
            return timed("A", p)

        figures = {}
        for name, fn in (("cold load of A", cold), ("A -> B, B never loaded before", first_b),
                         ("A -> B, B's delta in the pinned tier", pinned),
                         ("A -> B -> A, the second switch", resident)):
            fn()  # warm-up: imports, page cache
            runs, uploaded, after = zip(*(fn() for _ in range(args.repeat)))
            figures[name] = {"median_s": round(statistics.median(runs), 4),
                             "runs": [round(r, 4) for r in runs], "bytes_uploaded": uploaded[-1],
                             "collector_after_s": round(statistics.median(after), 4)}
            floor = f", floor {uploaded[-1] / (args.link_gbps * 1e9) * 1e3:.0f} ms" if args.link_gbps else ""
            print(f"{name}: {figures[name]['median_s'] * 1e3:.1f} ms (median of {args.repeat}: "
                  f"{', '.join(f'{r * 1e3:.0f}' for r in runs)}; {uploaded[-1] / 1e9:.2f} GB uploaded{floor}); "
                  f"collector after: {figures[name]['collector_after_s'] * 1e3:.0f} ms "
                  f"(runs: {', '.join(f'{a * 1e3:.0f}' for a in after)})")
        tensors = sum(len(store.tensor_locations(c["component_id"]))
                      for c in store.components_of(store.resolve("A")))
        print(json.dumps({"tensors_in_A": tensors, "link_gbps": args.link_gbps, "figures": figures},
                         indent=2))


if __name__ == "__main__":
    main()
