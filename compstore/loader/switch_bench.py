"""The switch-latency benchmark: A -> B with plain diffusers and with compstore, in one run.

    compstore bench switch --size tiny              # CPU, minutes
    compstore bench switch --size full --device cuda  # published shapes, a GPU

For each family (see `synthetic.switch_family`) it times, median of `repeat`:

    diffusers naive      drop A; DiffusionPipeline.from_pretrained(B).to(device)
    diffusers expert     from_pretrained(B, **A's components that B shares).to(device)
    compstore page cache A resident; from_pretrained(B, pool=...) from the store,
                         B's delta read from the page cache (packs read once
                         beforehand); B never loaded before in the process (its
                         UNet / transformer has A's architecture: a clone of
                         A's template, bound to B's tensors)
    compstore pinned     A resident; B (loaded once before) has its delta waiting in
                         the pool's pinned tier
    compstore resident   A -> B -> A within budget: the second switch
    compstore A -> C     (SDXL) as page cache, to C, which shares two thirds of
                         A's UNet tensors: a partly shared component moves only
                         its changed tensors (diffusers can share whole
                         components only); its floor is C's own delta
    compstore cold load  an empty pool, nothing loaded before: all of A from the
                         store onto the device
    compstore cold pool, an empty pool, A loaded before in the process (templates and
      warm process       tokenizers known): all of A's bytes from the store
    compstore pinned,    a budget of 0 and A dropped before the switch, as a service
      A dropped first    short of memory runs: B's delta from the pinned tier while
                         A's UNet / transformer goes there (its copies back queued
                         at the load's end, not waited for)
    compstore staged     A resident; B loaded on the host and its delta staged into
                         the pinned tier beforehand (`pool.stage`, not timed: a
                         service does it while A generates); the switch is B's move
                         to the device (`to_device`)
    floor                delta bytes / host-to-device bandwidth from pinned memory,
                         measured in the same run (on a CPU target: memcpy bandwidth)

and checks, before timing anything (a run cut short by a time limit still has
it), that B's image after A -> B -> A -> B equals plain diffusers' image
(bitwise; on a CPU target diffusers' weights are first copied to aligned memory,
as its own `.to("cuda")` does on a GPU). A "switch" includes `from_pretrained`:
building the pipeline object is part of what a user waits for; the upload alone
is reported beside it. It ends when the pipeline is ready on the caller's stream
(that stream synchronised): copies back into the pinned tier, on a stream of
their own, may still run. Each compstore system starts from `clear_caches()`, so
module templates and tokenizers are warm only where its scenario loaded them.
The SDXL figures are set against the issue's goals (`goals`), a verdict only
where the run is `--size full` on a GPU. Writes report.json, report.md and
switch.png into `out`, again after each system: a run stopped midway (a time
limit) leaves the figures it took. `keep=True` keeps the built families and
their stores under `workdir` and reuses them next time (a full-size family takes
minutes to write; `build_switch_families` builds them alone).
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..store import CompstoreError
from .pipeline import DiffusionPipeline
from .residency import ResidencyPool, TransferReport, to_device, usable_device
from .warm import clear_caches
from .synthetic import switch_family

@dataclass
class SystemFigures:
    name: str
    seconds: float  # median switch time (including from_pretrained)
    upload_seconds: float | None  # compstore: the pool's part of it
    bytes_moved: int  # bytes copied onto the device by this switch
    runs: list[float] = field(default_factory=list)
    transfer: dict | None = None  # compstore: the last run's TransferReport, per component
    floor_seconds: float | None = None  # a switch to another pipeline than B: its own floor


@dataclass
class FamilyFigures:
    family: str
    size: str
    device: str
    dtype: str
    pipeline_bytes: int  # B's tensor bytes
    delta_bytes: int  # B's tensor bytes that A lacks (compstore diff A B)
    h2d_bytes_per_s: float
    floor_seconds: float
    image_equal: bool | None = None  # checked before any system is timed
    image_max_abs_diff: float | None = None  # over the values finite in both
    image_nan_values: int | None = None  # NaN in diffusers' image (16-bit overflow): equal wants them too
    systems: list[SystemFigures] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    """Wait for what the caller's stream has queued: a loaded pipeline is ready on it."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _module_bytes(pipe) -> int:
    return sum(t.numel() * t.element_size() for m in pipe.components.values()
               if isinstance(m, torch.nn.Module) for t in list(m.parameters()) + list(m.buffers()))


def _h2d_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a host-to-device copy from pinned memory (CPU target: a memcpy), of
    `nbytes` but 256 MiB to 1 GiB: a tiny family's few MB would fit in the CPU's
    caches (1.3 to 113 GB/s "memcpy" from run to run on the VM) or pay a GPU copy's
    fixed latency."""
    nbytes = max(256 << 20, min(nbytes, 1 << 30))
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)
    _sync(device)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _sync(device)
        runs.append(time.perf_counter() - t0)
    return nbytes / min(runs)


def _warm(paths) -> None:
    """Read files once so that they are in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def _image(pipe, family: str, device: torch.device) -> np.ndarray:
    kw = dict(height=32, width=32) if family == "sdxl" else dict(height=32, width=32,
                                                                   max_sequence_length=32)
    return pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                generator=torch.Generator(device="cpu").manual_seed(0), **kw).images


def compare_images(mine: np.ndarray, reference: np.ndarray) -> tuple[bool, float, int]:
    """(equal, max abs diff, NaN values in `reference`). Random 16-bit weights can
    overflow to NaN; NaN != NaN would call two identical images different, so
    equal means the same NaN positions and the same other values.

    >>> compare_images(np.array([0.5, np.nan]), np.array([0.5, np.nan]))
    (True, 0.0, 1)
    """
    equal = bool(np.array_equal(mine, reference, equal_nan=True))
    diff = np.abs(mine.astype(np.float64) - reference)
    finite = np.isfinite(diff)
    return equal, float(diff[finite].max()) if finite.any() else 0.0, int(np.isnan(reference).sum())


def _median_run(fn: Callable[[], tuple[float, "TransferReport | int"]], repeat: int) -> SystemFigures:
    """Median of `repeat` timed runs after one warm-up. `fn` returns (seconds, the pool's
    TransferReport) for compstore, (seconds, bytes moved) for diffusers."""
    fn()  # warm-up: imports, allocator, page cache
    runs = [fn() for _ in range(repeat)]
    seconds = [r[0] for r in runs]
    last = runs[-1][1]
    if isinstance(last, TransferReport):
        return SystemFigures("", statistics.median(seconds),
                             statistics.median(r[1].seconds for r in runs), last.bytes_uploaded,
                             [round(x, 4) for x in seconds], last.to_dict())
    return SystemFigures("", statistics.median(seconds), None, last, [round(x, 4) for x in seconds])


def _built_family(family: str, size: str, dtype: torch.dtype, work: Path, echo: Callable[[str], None]):
    """The family's folders and its store under `work`, built and ingested unless a
    finished earlier build is there."""
    from ..store import Store

    root = work / f"{family}-{size}-{str(dtype).removeprefix('torch.')}"
    done = root / "built.json"  # written last: a half-built family is built again
    if done.is_file():
        echo(f"[{family}/{size}] reusing the family in {root}")
        folders = {name: Path(p) for name, p in json.loads(done.read_text()).items()}
        return folders, Store(root / "store")
    shutil.rmtree(root, ignore_errors=True)
    echo(f"[{family}/{size}] building the family ...")
    folders = switch_family(family, size, root / "folders", dtype=dtype)
    store = Store(root / "store")
    for name, folder in folders.items():
        store.ingest(folder, name)
    done.write_text(json.dumps({name: str(p) for name, p in folders.items()}))
    return folders, store


PARTLY_SHARED = "compstore A -> C (2/3 of the UNet shared)"
PINNED_DROPPED = "compstore pinned, A dropped first"
STAGED = "compstore staged (pool.stage), B's move only"
PAGE_CACHE, PINNED, RESIDENT, COLD = ("compstore page cache", "compstore pinned",
                                      "compstore resident (A->B->A)", "compstore cold load")


def goals(family: dict) -> list[dict]:
    """The issue's "done when" goals for the SDXL-size pair (measured with `--size
    full` on an H100-class GPU), each with the figure this run has for it (None: not
    timed yet) and whether it is met; [] for another family. Where a run is not that,
    they are a yardstick, no verdict: `applies` says which.

    >>> goals({"family": "flux", "size": "full", "device": "cuda:0", "systems": []})
    []
    """
    if family["family"] != "sdxl":
        return []
    by_name = {s["name"]: s for s in family["systems"]}

    def seconds(name: str) -> float | None:
        return round(by_name[name]["seconds"], 4) if name in by_name else None

    pinned = seconds(PINNED)
    rows = [("A -> B, B's delta in the page cache", seconds(PAGE_CACHE), "<= 0.45 s",
             lambda v: v <= 0.45),
            ("A -> B, B's delta in the pinned tier, vs the floor",
             None if pinned is None or not family["floor_seconds"] else
             round(pinned / family["floor_seconds"], 2), "<= 1.5x",
             lambda v: v <= 1.5),
            ("A -> B -> A, the second switch", seconds(RESIDENT), "<= 0.05 s, 0 bytes moved",
             lambda v: v <= 0.05 and by_name[RESIDENT]["bytes_moved"] == 0),
            ("cold load of A onto the device", seconds(COLD), "<= 0.6 s", lambda v: v <= 0.6),
            ("B's image equals diffusers'", family.get("image_equal"), "True", lambda v: v is True)]
    applies = family["size"] == "full" and family["device"].startswith("cuda")
    return [{"goal": goal, "value": value, "limit": limit, "applies": applies,
             "met": None if value is None else bool(met(value))} for goal, value, limit, met in rows]


def bench_family(family: str, size: str, device: torch.device, dtype: torch.dtype, repeat: int,
                 work: Path, echo: Callable[[str], None],
                 save: Callable[[FamilyFigures], None] = lambda figures: None) -> FamilyFigures:
    """Time every system for one family; `save(figures so far)` runs after each."""
    import diffusers

    folders, store = _built_family(family, size, dtype, work, echo)
    delta = store.diff("A", "B")
    shared = [c["slot"] for c in delta.components if c["status"] == "identical"]
    _warm([p for f in folders.values() for p in f.rglob("*.safetensors")])
    _warm((store.home / "objects" / "packs").glob("*.pack"))

    def ours(ref: str, pool: ResidencyPool):
        pipe = DiffusionPipeline.from_pretrained(ref, store=store, torch_dtype=dtype, pool=pool)
        return pipe, pool.last_report

    def switch(ref: str, pool: ResidencyPool):
        t0 = time.perf_counter()
        pipe, rep = ours(ref, pool)
        _sync(device)
        return pipe, rep, time.perf_counter() - t0

    def theirs(folder: Path, **components):
        return diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype,
                                                           **components).to(device)

    h2d = _h2d_bandwidth(device, delta.delta_bytes)
    floor = delta.delta_bytes / h2d
    figures = FamilyFigures(family, size, str(device), str(dtype).removeprefix("torch."), 0,
                            delta.delta_bytes, h2d, floor)
    systems = figures.systems

    # Images first (a run cut short by a time limit still has them): B after
    # A -> B -> A -> B through one pool vs plain diffusers' B.
    echo(f"[{family}/{size}] B's image after A -> B -> A -> B against diffusers' ...")
    pool = ResidencyPool(device, budget_bytes=1 << 62)
    a, _ = ours("A", pool)
    b, _ = ours("B", pool)
    a, _ = ours("A", pool)
    b, _ = ours("B", pool)
    mine = _image(b, family, device)
    del a, b, pool
    _free(device)
    plain = theirs(folders["B"])
    if device.type == "cpu":  # diffusers leaves CPU weights at unaligned file offsets, where
        for m in plain.components.values():  # SIMD kernels sum in another order (~1e-7)
            if isinstance(m, torch.nn.Module):
                for t in list(m.parameters()) + list(m.buffers()):
                    t.data = t.data.clone()
    reference = _image(plain, family, device)
    del plain
    _free(device)

    figures.image_equal, figures.image_max_abs_diff, figures.image_nan_values = \
        compare_images(mine, reference)
    save(figures)  # a run stopped before the first system still reports the check

    def naive():
        a = theirs(folders["A"])
        del a
        t0 = time.perf_counter()
        _free(device)  # dropping A is part of the naive switch
        b = theirs(folders["B"])
        _sync(device)
        s = time.perf_counter() - t0
        n = _module_bytes(b)
        del b
        _free(device)
        return s, n

    def expert():
        a = theirs(folders["A"])
        t0 = time.perf_counter()
        b = theirs(folders["B"], **{slot: getattr(a, slot) for slot in shared})
        _sync(device)
        s = time.perf_counter() - t0
        n = sum(t.numel() * t.element_size() for slot, m in b.components.items()
                if isinstance(m, torch.nn.Module) and slot not in shared
                for t in list(m.parameters()) + list(m.buffers()))
        del a, b
        _free(device)
        return s, n

    def from_page_cache(target: str):
        """A resident, then a switch to `target`, never loaded before in the process."""
        def run():
            clear_caches()  # what this process has loaded before: only what the scenario says
            pool = ResidencyPool(device, budget_bytes=1 << 62)
            a, _ = ours("A", pool)
            b, rep, s = switch(target, pool)
            del a, b, pool
            _free(device)
            return s, rep
        return run

    page_cache, partly_shared = from_page_cache("B"), from_page_cache("C")

    def from_pinned(drop_a: bool):
        """B (loaded once before) has its delta waiting in the pinned tier; A stays
        resident, or is dropped first (`drop_a`: its idle tensors go to the tier
        during the switch)."""
        def run():
            clear_caches()  # what this process has loaded before: only what the scenario says
            pool = ResidencyPool(device, budget_bytes=0, pinned_budget_bytes=1 << 62)
            b, _ = ours("B", pool)
            del b
            gc.collect()
            a, _ = ours("A", pool)  # B's delta goes to the pinned tier
            if drop_a:
                a = None
                gc.collect()
            b, rep, s = switch("B", pool)
            assert rep.bytes_from_pinned > 0, "the pinned tier served nothing"
            if drop_a:
                assert pool.idle_bytes == 0, "the switch left idle tensors on the device"
            del a, b, pool
            _free(device)
            return s, rep
        return run

    pinned, pinned_dropped = from_pinned(False), from_pinned(True)

    def staged():
        """A resident; B on the host, its delta staged beforehand; B's move is timed."""
        clear_caches()  # what this process has loaded before: only what the scenario says
        pool = ResidencyPool(device, budget_bytes=1 << 62, pinned_budget_bytes=1 << 62)
        a, _ = ours("A", pool)
        b = DiffusionPipeline.from_pretrained("B", store=store, torch_dtype=dtype)
        assert pool.stage(b) > 0, "nothing was staged"
        t0 = time.perf_counter()
        rep = to_device(b, device, pool=pool)
        _sync(device)
        s = time.perf_counter() - t0
        assert rep.bytes_from_pinned > 0, "the pinned tier served nothing"
        del a, b, pool
        _free(device)
        return s, rep

    def resident():
        clear_caches()  # what this process has loaded before: only what the scenario says
        pool = ResidencyPool(device, budget_bytes=1 << 62)
        a, _ = ours("A", pool)
        b, _ = ours("B", pool)
        del a
        gc.collect()
        a, rep, s = switch("A", pool)
        del a, b, pool
        _free(device)
        return s, rep

    def cold():
        clear_caches()  # what this process has loaded before: only what the scenario says
        pool = ResidencyPool(device, budget_bytes=1 << 62)
        a, rep, s = switch("A", pool)
        del a, pool
        _free(device)
        return s, rep

    def cold_pool():
        clear_caches()
        ours("A", ResidencyPool(device, budget_bytes=1 << 62))  # the process has seen A ...
        _free(device)
        pool = ResidencyPool(device, budget_bytes=1 << 62)  # ... but the device is empty
        a, rep, s = switch("A", pool)
        del a, pool
        _free(device)
        return s, rep

    plan = [("diffusers naive", naive), ("diffusers expert", expert),
            (PAGE_CACHE, page_cache), (PINNED, pinned), (RESIDENT, resident)]
    if "C" in folders:
        plan.append((PARTLY_SHARED, partly_shared))
    plan += [(COLD, cold), ("compstore cold pool, warm process", cold_pool),
             (PINNED_DROPPED, pinned_dropped), (STAGED, staged)]
    for name, fn in plan:
        echo(f"[{family}/{size}] {name} ...")
        system = _median_run(fn, repeat)
        system.name = name
        if fn is partly_shared:
            system.floor_seconds = store.diff("A", "C").delta_bytes / h2d
        systems.append(system)
        figures.pipeline_bytes = systems[0].bytes_moved  # naive moves all of B
        save(figures)

    systems.append(SystemFigures("floor", floor, None, delta.delta_bytes, [floor]))
    save(figures)
    store.close()
    return figures


def _target(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The benchmark's device (default: cuda if available, else cpu) and weights dtype
    (default: float16 on cuda, float32 elsewhere)."""
    dev = (torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None
           else usable_device(device, "--device "))
    return dev, getattr(torch, dtype) if dtype else (torch.float16 if dev.type == "cuda" else torch.float32)


def _kept(workdir: str | Path | None) -> Path:
    """Where `keep` builds the families: `workdir` (default: the temp dir)/compstore-switch-bench."""
    work = _folder(workdir or tempfile.gettempdir(), "--workdir") / "compstore-switch-bench"
    work.mkdir(exist_ok=True)
    return work


def build_switch_families(*, size: str = "tiny", families: tuple[str, ...] = ("sdxl", "flux"),
                          device: str | None = None, dtype: str | None = None,
                          workdir: str | Path | None = None,
                          echo: Callable[[str], None] = print) -> dict[str, dict[str, str]]:
    """Build and ingest the families that `run_switch_bench(keep=True)` with the same
    arguments reuses, timing nothing; return family -> pipeline name -> folder. A GPU
    session runs this beside its tests, so that the benchmark starts on built
    families (a full-size SDXL family took 134 s on a 2-core VM).

    >>> build_switch_families(size="full", families=("sdxl",), workdir="bench-out")  # doctest: +SKIP
    """
    _, dt = _target(device, dtype)  # the device decides the default dtype, which names the build
    work, built = _kept(workdir), {}
    for f in families:
        folders, store = _built_family(f, size, dt, work, echo)
        store.close()
        built[f] = {name: str(folder) for name, folder in folders.items()}
    return built


def run_switch_bench(*, size: str = "tiny", families: tuple[str, ...] = ("sdxl", "flux"),
                     device: str | None = None, dtype: str | None = None, repeat: int = 3,
                     out: str | Path = "switch-report", workdir: str | Path | None = None,
                     keep: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run the benchmark; write report.json, report.md, switch.png into `out` (after
    each system, so a stopped run leaves what it measured); return the report.
    `keep`: build the families in `workdir` (default: the temp dir) and reuse them.

    >>> run_switch_bench(size="tiny", families=("sdxl",), repeat=1)  # doctest: +SKIP
    """
    if repeat < 1:
        raise CompstoreError(f"--repeat {repeat}: a median needs at least 1 timed run")
    dev, dt = _target(device, dtype)
    if workdir is not None:
        workdir = _folder(workdir, "--workdir")
    out = _folder(out, "--out")
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "repeat": repeat, "families": []}

    def save(figures: FamilyFigures) -> None:
        family = report["families"][-1] = asdict(figures)
        family["goals"] = goals(family)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(markdown(report))

    with contextlib.ExitStack() as stack:
        if keep:
            work = _kept(workdir)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compstore-switch-",
                                                                        dir=workdir)))
        for f in families:
            report["families"].append(None)
            bench_family(f, size, dev, dt, repeat, work, echo, save)
    chart(report, out / "switch.png")
    return report


def _folder(path: str | Path, label: str) -> Path:
    """`path`, made a folder if it is none yet (with its parents), or a
    `CompstoreError` naming the option when it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompstoreError(f"{label} {str(path)!r} cannot be a folder here ({e.strerror}): "
                             "pass a folder you can write to") from None
    return path


def markdown(report: dict) -> str:
    lines = [f"# Switch latency: A -> B ({report['device']}, torch {report['torch']}, "
             f"median of {report['repeat']})", ""]
    for f in report["families"]:
        nan = f.get("image_nan_values") or 0
        images = f"{f['image_equal']} (max abs diff {f['image_max_abs_diff']:.2g}" + \
            (f"; {nan:,} NaN values in diffusers' image)" if nan else ")")
        lines += [f"## {f['family']} ({f['size']}, {f['dtype']} on {f['device']})", "",
                  f"B: {f['pipeline_bytes']:,} tensor bytes; delta (B's bytes A lacks): "
                  f"{f['delta_bytes']:,}; host-to-device {f['h2d_bytes_per_s'] / 1e9:.2f} GB/s "
                  f"from pinned memory; floor {f['floor_seconds'] * 1e3:.1f} ms. B's image after "
                  f"A->B->A->B equals plain diffusers': {images}.", "",
                  "| system | switch s | upload s | bytes moved | vs naive | vs floor |",
                  "|---|---|---|---|---|---|"]
        naive = f["systems"][0]["seconds"] if f["systems"] else None
        for s in f["systems"]:
            up = "-" if s["upload_seconds"] is None else f"{s['upload_seconds']:.4f}"
            floor = s.get("floor_seconds") or f["floor_seconds"]
            lines.append(f"| {s['name']} | {s['seconds']:.4f} | {up} | {s['bytes_moved']:,} | "
                         f"{s['seconds'] / naive:.2f}x | {s['seconds'] / floor:.1f}x |")
        lines.append("")
        if f.get("goals"):
            where = "this run is one" if f["goals"][0]["applies"] else \
                "a yardstick only: this run is not one"
            lines += [f"Goals (#5's done-when, for `--size full` on an H100-class GPU; {where}):", "",
                      "| goal | this run | limit | met |", "|---|---|---|---|"]
            lines += [f"| {g['goal']} | {'-' if g['value'] is None else g['value']} | {g['limit']} | "
                      f"{'-' if g['met'] is None else ('yes' if g['met'] else 'no')} |" for g in f["goals"]]
            lines.append("")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = report["families"]
    fig, axes = plt.subplots(len(fams), 2, figsize=(12, 3.2 * len(fams)), squeeze=False)
    for row, f in zip(axes, fams):
        names = [s["name"] for s in f["systems"]]
        row[0].barh(names, [s["seconds"] for s in f["systems"]], color="tab:blue")
        row[0].set_xlabel("seconds (switch A -> B)")
        row[0].set_title(f"{f['family']} {f['size']} on {f['device']}")
        row[1].barh(names, [s["bytes_moved"] / 2**20 for s in f["systems"]], color="tab:orange")
        row[1].set_xlabel("MiB moved onto the device")
        row[1].set_yticklabels([])
        for ax in row:
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
