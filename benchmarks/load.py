"""CPU time and peak RSS of `from_pretrained`: compstore from its store vs diffusers from
the same files on disk, measured in one run, each load in a fresh process.

    python benchmarks/load.py                 # SD-1.5-sized pipeline, fp16 files, dtype=float16
    python benchmarks/load.py --dtype none    # no dtype: diffusers upcasts to fp32 (a copy)
    python benchmarks/load.py --size tiny     # the test suite's tiny pipeline
    python benchmarks/load.py --as-published  # tensor names as SD 1.5's repo has them
    python benchmarks/load.py --from-folder   # compstore given the folder, as diffusers is
    python benchmarks/load.py --verify        # compstore with verify=True (re-hashes, copies)
    python benchmarks/load.py --single-file   # from_single_file of one original-format .safetensors
    python benchmarks/load.py --gguf          # a Flux-width transformer's from_single_file of a .gguf
    python benchmarks/load.py --bfl           # the same of a BFL fp8r .safetensors

For each system and repeat a child process imports torch/diffusers, then times
  load:        from_pretrained(...) alone
  load+touch:  from_pretrained(...) and a read of every weight (what a first
               inference step does): compstore's weights are mapped lazily, so
               `load` alone flatters it; `load+touch` is the fair comparison.
               The read is a `max()`: until 2026-11-24 it was `.float().sum()`,
               whose fp32 temporaries measured glibc's heap more than the read
               (a process that loaded with diffusers has a large heap already
               faulted in; compstore's, zero-copy, does not: 556k page faults
               against 35k for the same sums, 8.3k against 6.7k for `max()`).
CPU time is the process's user+sys time over the call; peak RSS is VmHWM over the
call (reset just before it), so imports are not counted. Medians are printed with
the ratio compstore / diffusers (goal: <= 1.0 for time and for RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, diffusers, compstore
diffusers.utils.logging.set_verbosity_error(); diffusers.utils.logging.disable_progress_bar()
import transformers; transformers.utils.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
system, where, store, touch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
kw = {} if sys.argv[5] == "none" else {"dtype": getattr(torch, sys.argv[5])}
verify = {"verify": True} if sys.argv[6] == "1" else {}
config = sys.argv[7]  # for from_single_file: the pipeline folder its configs come from
quantized = sys.argv[8]  # "gguf" or "bfl": a transformer from such a file, computing in bf16
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
if quantized:
    method = {"gguf": diffusers.GGUFQuantizationConfig, "bfl": diffusers.BFLQuantizationConfig}[quantized]
    kw = {"quantization_config": method(compute_dtype=torch.bfloat16)}
    cls = compstore.FluxTransformer2DModel if system == "compstore" else diffusers.FluxTransformer2DModel
    st = {"store": compstore.Store(store)} if system == "compstore" else {}
    load = lambda: cls.from_single_file(where, config=config, **kw, **st)
elif system == "compstore" and config:
    st = compstore.Store(store)  # converted before the timed loads: each finds the file unchanged
    load = lambda: compstore.StableDiffusionPipeline.from_single_file(where, config=config, store=st, **kw, **verify)
elif system == "compstore":
    st = compstore.Store(store)
    load = lambda: compstore.DiffusionPipeline.from_pretrained(where, store=st, **kw, **verify)
elif config:
    load = lambda: diffusers.StableDiffusionPipeline.from_single_file(where, config=config, **kw)
else:
    load = lambda: diffusers.DiffusionPipeline.from_pretrained(where, **kw)
base = rss()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
c0, t0 = time.process_time(), time.perf_counter()
pipe = load()
if touch:
    for model in [pipe] if quantized else [getattr(pipe, name) for name in ("unet", "vae", "text_encoder")]:
        for p in (model.state_dict().values() if quantized else model.parameters()):
            if quantized:  # its bytes: fp8 has no max() on CPU, a GGUFParameter's is its subclass's
                p = (p.as_tensor() if hasattr(p, "as_tensor") else p).reshape(-1).view(torch.uint8)
            float(p.detach().max())  # reads every byte, allocates nothing large (see above)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": hwm() - base}))
"""


def run_child(system: str, where: str, store: str, touch: bool, dtype: str, verify: bool,
              config: str = "", quantized: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, system, where, store, "1" if touch else "0", dtype,
                          "1" if verify else "0", config, quantized],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", choices=["float16", "float32", "none"], default="float16",
                    help="dtype= passed to both; 'none' passes nothing (diffusers then upcasts "
                         "its models to fp32, transformers keeps the checkpoint's dtype)")
    ap.add_argument("--as-published", action="store_true",
                    help="names as SD 1.5's repo has them, which the libraries rename on load "
                         "(the CLIP text encoder's text_model. prefix, the VAE's old attention names)")
    ap.add_argument("--from-folder", action="store_true",
                    help="compstore loads the folder (as a drop-in call passes it; ingested once "
                         "before the timed loads, which find it unchanged), not the ref 'bench'")
    ap.add_argument("--verify", action="store_true",
                    help="compstore loads with verify=True: every tensor re-hashed, the model "
                         "built on the copies hashed")
    ap.add_argument("--single-file", action="store_true",
                    help="both load one original-format .safetensors of the pipeline with "
                         "StableDiffusionPipeline.from_single_file (configs from its folder); "
                         "compstore's conversion is done once before the timed loads")
    quantized = ap.add_mutually_exclusive_group()
    quantized.add_argument("--gguf", action="store_true",
                           help="both load a Flux-width transformer (1 double and 2 single blocks, 677M "
                                "parameters; --size tiny: a tiny one) from one GGUF file, its Linear weights "
                                "Q8_0, with FluxTransformer2DModel.from_single_file(..., quantization_config="
                                "GGUFQuantizationConfig(compute_dtype=torch.bfloat16)); compstore's "
                                "conversion is done once before the timed loads")
    quantized.add_argument("--bfl", action="store_true",
                           help="the same from a BFL fp8r .safetensors (BFLQuantizationConfig)")
    ap.add_argument("--workdir", default=None, help="reused between runs when given "
                    "[default: a temporary folder, removed at the end]")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compstore import Store
    from compstore.loader import synthetic

    with contextlib.ExitStack() as cleanup:
        work = Path(args.workdir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="compstore-load-")))
        run(args, work, Store, synthetic)


def run(args, work: Path, Store, synthetic) -> None:
    quantized = "gguf" if args.gguf else "bfl" if args.bfl else ""
    layout = f"{args.size}-published" if args.as_published else args.size
    folder, store_dir = work / f"pipeline-{layout}", work / f"store-{layout}"
    if not quantized and not (folder / "model_index.json").exists():
        t0 = time.perf_counter()
        pipe = synthetic.sd15_pipeline() if args.size == "sd15" else synthetic.tiny_sd_pipeline()
        pipe.save_pretrained(folder)
        del pipe
        if args.as_published:
            synthetic.rename_as_published(folder)
        print(f"built {folder} in {time.perf_counter() - t0:.0f} s")
    status = "-"
    if not quantized:
        with Store(store_dir) as store:
            status = store.ingest(folder, "bench").status
            if args.from_folder:  # what a first from_pretrained(folder) does
                store.ingest(folder, str(folder.resolve()))
        nbytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    checkpoint, config = None, ""
    if quantized:
        import diffusers

        checkpoint, config = _quantized_file(work, args.size, synthetic, quantized)
        from compstore import ingest_single_file

        with Store(store_dir) as store:
            first = ingest_single_file(checkpoint, "FluxTransformer2DModel", config=config, store=store,
                                       quantization_config=diffusers.BFLQuantizationConfig() if args.bfl else None)
        nbytes = checkpoint.stat().st_size
        status = first.status
        print(f"{quantized} file {checkpoint.name}: {first.status} in {first.seconds:.1f} s, wrote "
              f"{first.written_bytes:,} bytes new, reused {first.reused_bytes:,}")
        subprocess.run(["cat", str(checkpoint)], stdout=subprocess.DEVNULL)
    elif args.single_file:
        checkpoint, config = work / f"{layout}.safetensors", str(folder)
        if not checkpoint.exists():
            import torch
            from diffusers import StableDiffusionPipeline

            # fp16, as such files are mostly published (the folder's dtype for the sd15 size)
            synthetic.save_as_single_file(StableDiffusionPipeline.from_pretrained(folder), checkpoint,
                                          dtype=torch.float16)
        from compstore import ingest_single_file

        with Store(store_dir) as store:
            first = ingest_single_file(checkpoint, "StableDiffusionPipeline", config=config, store=store)
        nbytes = checkpoint.stat().st_size
        print(f"single file {checkpoint.name}: {first.status} in {first.seconds:.1f} s, wrote "
              f"{first.written_bytes:,} bytes new, reused {first.reused_bytes:,}")
        subprocess.run(["cat", str(checkpoint)], stdout=subprocess.DEVNULL)
    if not quantized:
        subprocess.run(["cat", *map(str, folder.rglob("*.safetensors"))], stdout=subprocess.DEVNULL)
    subprocess.run(["cat", *map(str, (store_dir / "objects" / "packs").glob("*"))], stdout=subprocess.DEVNULL)

    results: dict[str, dict[str, list[dict]]] = {}
    for touch in (False, True):
        mode = "load+touch" if touch else "load"
        results[mode] = {"compstore": [], "diffusers": []}
        for _ in range(args.repeat):
            for system in ("diffusers", "compstore"):
                where = "bench" if system == "compstore" and not args.from_folder else str(folder)
                results[mode][system].append(run_child(system, str(checkpoint or where), str(store_dir), touch,
                                                       args.dtype, args.verify, config, quantized))

    figures = {"size": args.size, "as_published": args.as_published, "dtype": args.dtype,
               "from_folder": args.from_folder, "verify": args.verify, "single_file": args.single_file,
               "quantized_file": quantized or None,
               "pipeline_bytes": nbytes, "repeat": args.repeat}
    what = (f"transformer: {checkpoint.name}, compute dtype bfloat16" if quantized else
            f"pipeline: {layout} (fp16 files), dtype={args.dtype}")
    print(f"{what}, {nbytes / 2**30:.2f} GiB on disk (ingested: {status}); "
          f"compstore loads {'the single file' if quantized or args.single_file else 'the folder' if args.from_folder else 'the ref'}"
          f"{' with verify=True' if args.verify else ''}; "
          f"median of {args.repeat}, each load in a fresh process, page cache warm")
    print(f"{'':12s} {'':10s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MiB':>13s}")
    for mode, by_system in results.items():
        med = {s: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for s, runs in by_system.items()}
        for system in ("diffusers", "compstore"):
            m = med[system]
            print(f"{mode:12s} {system:10s} {m['wall_s']:8.3f} {m['cpu_s']:8.3f} "
                  f"{m['peak_rss_bytes'] / 2**20:13.0f}")
        ratio = {k: round(med["compstore"][k] / med["diffusers"][k], 3) if med["diffusers"][k] else None
                 for k in med["compstore"]}
        print(f"{mode:12s} {'ratio':10s} {ratio['wall_s']:8.3f} {ratio['cpu_s']:8.3f} "
              f"{ratio['peak_rss_bytes']:13.3f}   (compstore / diffusers)")
        figures[mode] = {"median": med, "ratio": ratio}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))


def _quantized_file(work: Path, size: str, synthetic, method: str) -> tuple[Path, str]:
    """A Flux transformer's GGUF file (Linear weights Q8_0, the rest F32) or BFL fp8r
    file (by diffusers' helper), and its model folder (the configs), made once per
    workdir."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    width = "3072" if size == "sd15" else "tiny"
    path = work / (f"flux-{width}-Q8_0.gguf" if method == "gguf" else f"flux-{width}-fp8r.safetensors")
    folder = work / f"flux-{width}-transformer"
    if not path.exists():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        shape = (dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
                      joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64) if size == "sd15" else
                 dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, pooled_projection_dim=32, in_channels=4, axes_dims_rope=(4, 4, 8)))
        model = FluxTransformer2DModel(**shape)
        model.save_config(folder)
        state = model.state_dict()
        if method == "gguf":
            types = {k: "Q8_0" for k, v in state.items() if v.ndim == 2 and v.shape[1] % 32 == 0}
            synthetic.save_as_gguf(state, path, types)
        else:
            save_file({k: v.contiguous() for k, v in synthetic.as_bfl_quantized(state, "fp8r").items()}, path)
        print(f"built {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    return path, str(folder)


if __name__ == "__main__":
    main()
