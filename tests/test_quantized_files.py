"""Single files whose weights are quantized in the file: GGUF (`compstore.<Model>.
from_single_file("x.gguf", quantization_config=GGUFQuantizationConfig(...))`) and BFL's
fp8r and nvfp4 safetensors (`quantization_config=BFLQuantizationConfig(...)`). Each is
converted with diffusers once, stored as the quantized tensors (GGUF's with their
types), and loads as diffusers' `from_single_file` of the file does.

The files are the tiny Flux family's B transformer: as GGUF written by the gguf
package (`synthetic.save_as_gguf`), its Linear weights quantized to several GGML types,
as city96's Flux files are published; as BFL files quantized by diffusers' own
helpers (`synthetic.as_bfl_quantized`)."""

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import GGUFQuantizationConfig
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

import compstore
from compstore.loader import synthetic as syn
from conftest import store_state

KINDS = ("Q8_0", "Q4_0", "Q5_1", "BF16")


@pytest.fixture(scope="module")
def flux_gguf(tmp_path_factory):
    """The tiny Flux family (A; B = A with another transformer) and B's transformer as
    a GGUF file: each Linear weight whose rows are whole blocks in one of KINDS in
    turn, the 2-D others F16 and the rest F32 (a file mixing float dtypes)."""
    root = tmp_path_factory.mktemp("flux-gguf")
    folders = syn.switch_family("flux", "tiny", root / "family")
    state = diffusers.FluxTransformer2DModel.from_pretrained(folders["B"] / "transformer").state_dict()
    linear = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2 and v.shape[1] % 32 == 0]
    types = {k: KINDS[i % len(KINDS)] for i, k in enumerate(linear)}
    state = {k: v.half() if v.ndim == 2 and k not in types else v for k, v in state.items()}
    return folders, syn.save_as_gguf(state, root / "flux-b-Q4_0.gguf", types), types


@pytest.fixture
def flux_store(flux_gguf, tmp_path):
    folders, _, _ = flux_gguf
    store = compstore.Store(tmp_path / "store")
    store.ingest(folders["A"], "A")
    return store


def theirs(flux_gguf, compute_dtype, **kw):
    folders, path, _ = flux_gguf
    return diffusers.FluxTransformer2DModel.from_single_file(
        str(path), config=str(folders["A"]), subfolder="transformer",
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype), **kw)


def same_gguf_model(ours, theirs) -> None:
    """The same modules (GGUFLinear where diffusers has one, with its compute dtype)
    and tensors: names, classes, GGUF types, dtypes and bytes."""
    assert {n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in theirs.named_modules()}
    for (name, m), (_, t) in zip(ours.named_modules(), theirs.named_modules()):
        if isinstance(m, GGUFLinear):
            assert m.compute_dtype == t.compute_dtype, name
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert (type(a[k]), a[k].dtype, getattr(a[k], "quant_type", None)) == (
            type(b[k]), b[k].dtype, getattr(b[k], "quant_type", None)), k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    # ours also names its quantization, as a model diffusers' from_pretrained loads quantized
    loaded = {"_name_or_path", "quantization_config", "_pre_quantization_dtype"}
    assert {k: v for k, v in ours.config.items() if k not in loaded} == {
        k: v for k, v in theirs.config.items() if k not in loaded}
    assert ours.config.quantization_config is ours.hf_quantizer.quantization_config
    assert ours.hf_quantizer.compute_dtype == theirs.hf_quantizer.compute_dtype


def image(pipe) -> np.ndarray:
    return pipe("a photo of a cat", num_inference_steps=2, output_type="np", height=32, width=32,
                max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_a_gguf_file_loads_as_diffusers_loads_it(flux_gguf, flux_store, compute_dtype):
    """The same GGUFLinear layers, GGUF types and bytes, float weights and image as
    diffusers' `from_single_file` of the file, in the compute dtype of the load: the
    file is converted once (float32 compute, the F16 weights kept F16 beside F32 ones
    as float32, unrounded), and every later load, in any compute dtype, reads the
    store. The quantized weights are views of the store, not copies."""
    folders, path, types = flux_gguf
    store = flux_store
    reference = theirs(flux_gguf, compute_dtype)
    config = GGUFQuantizationConfig(compute_dtype=compute_dtype)
    ours = compstore.FluxTransformer2DModel.from_single_file(path, config="A", quantization_config=config,
                                                             store=store)
    same_gguf_model(ours, reference)
    assert {k for k, v in ours.state_dict().items() if isinstance(v, GGUFParameter)} == set(types)
    r = compstore.ingest_single_file(path, "FluxTransformer2DModel", config="A", store=store)
    assert r.status == "unchanged" and r.ref == f"{path}#FluxTransformer2DModel"
    [component] = store.components_of(r.snapshot)
    stored = json.loads(store.read_file(r.snapshot, "config.json"))
    assert stored["quantization_config"] == {"quant_method": "gguf", "compute_dtype": "float32"}
    assert json.loads(store.weights_metadata(component["component_id"])["gguf_quant_types"]) == types
    # each float tensor in the narrowest of the file's dtypes that holds it: the F16
    # weights stay F16, beside F32 ones (random biases; norms of ones fit F16)
    locations = store.tensor_locations(component["component_id"])
    f16 = {loc.name for loc in locations if loc.name not in types and len(loc.shape) == 2}
    assert f16 and {loc.dtype for loc in locations if loc.name in f16} == {"F16"}
    assert {loc.dtype for loc in locations} == {"U8", "F16", "F32"}
    again = compstore.FluxTransformer2DModel.from_single_file(path, config="A", quantization_config=config,
                                                              store=store)
    same_gguf_model(again, reference)
    q = next(iter(types))
    assert again.get_parameter(q).data_ptr() != ours.get_parameter(q).data_ptr()  # a model of its own
    pipe = compstore.FluxPipeline.from_pretrained("A", transformer=ours, dtype=compute_dtype, store=store)
    plain = diffusers.FluxPipeline.from_pretrained(folders["A"], transformer=reference, dtype=compute_dtype)
    assert (image(pipe) == image(plain)).all()


@pytest.mark.parametrize("compute_dtype, dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_a_gguf_file_loaded_with_a_dtype_is_as_diffusers_loads_it(flux_gguf, flux_store, compute_dtype, dtype):
    """`torch_dtype=` beside the GGUF config (diffusers' GGUF examples pass both): the
    float weights in that dtype, the GGUFLinear layers computing in the config's."""
    _, path, _ = flux_gguf
    ours = compstore.FluxTransformer2DModel.from_single_file(
        path, config="A", quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        torch_dtype=dtype, store=flux_store)
    same_gguf_model(ours, theirs(flux_gguf, compute_dtype, torch_dtype=dtype))
    assert ours.norm_out.linear.bias.dtype == dtype


def test_a_stored_gguf_model_loads_from_its_ref_and_moves_whole_through_a_pool(flux_gguf, flux_store):
    """The stored model is a ref like any (the file's path#class): `load_component`
    and a pipeline's `from_pretrained` with the model passed in load it with the saved
    config (float32 compute, as diffusers' default), or with a GGUF config given, in
    its compute dtype. A pool moves it with diffusers' own `.to()` (its GGUF types
    kept), and the pipeline's other models through the pool as ever."""
    from test_residency import CountingCopier

    _, path, types = flux_gguf
    store = flux_store
    ref = compstore.ingest_single_file(path, "FluxTransformer2DModel", config="A", store=store).ref
    same_gguf_model(compstore.load_component(ref, store=store), theirs(flux_gguf, torch.float32))
    half = compstore.load_component(ref, store=store,
                                    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    same_gguf_model(half, theirs(flux_gguf, torch.bfloat16))
    pipe = compstore.FluxPipeline.from_pretrained("A", transformer=half, store=store)
    copier = CountingCopier()
    pool = compstore.ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    report = compstore.to_device(pipe, "meta", pool=pool)
    moved = {c.component: c for c in report.components}
    assert moved["transformer"].bytes_from_store > 0
    assert copier.bytes == sum(c.bytes_from_store for c in report.components if c.component != "transformer")
    q = next(iter(types))
    assert pipe.transformer.get_parameter(q).device.type == "meta"
    assert pipe.transformer.get_parameter(q).quant_type.name == types[q]


@pytest.fixture
def gguf_hub(monkeypatch, flux_gguf, tmp_path):
    """An emulated Hub with org/G holding the GGUF file (as city96/FLUX.1-dev-gguf)."""
    import shutil

    from conftest import use_hub
    from hub_emulator import HubEmulator

    _, path, _ = flux_gguf
    repo = tmp_path / "G"
    repo.mkdir()
    shutil.copy(path, repo / path.name)
    hub = HubEmulator()
    hub.add_repo("org/G", repo)
    use_hub(monkeypatch, hub)
    yield hub
    hub.close()


def test_a_gguf_file_on_the_hub_is_pulled_once_and_later_calls_read_none_of_it(
        flux_gguf, flux_store, gguf_hub, monkeypatch, tmp_path):
    """`from_single_file("https://huggingface.co/org/G/blob/main/x.gguf")`, with no
    config (the one diffusers infers, taken from the store): pulled into the store,
    its header read from one local copy, converted once, its quantized weights stored
    once for the file and its conversion. A later call downloads nothing, converts
    nothing and reads none of the file, online or offline."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

    from compstore.loader import single_file

    folders, path, _ = flux_gguf
    store = flux_store
    inferred = fetch_diffusers_config(load_single_file_checkpoint(str(path)))["pretrained_model_name_or_path"]
    store.ingest(folders["A"], inferred)
    url = f"https://huggingface.co/org/G/blob/main/{path.name}"
    config = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    converted = compstore.ingest_single_file(url, "FluxTransformer2DModel", store=store)
    ours = compstore.FluxTransformer2DModel.from_single_file(url, quantization_config=config, store=store)
    same_gguf_model(ours, theirs(flux_gguf, torch.bfloat16))
    commit = gguf_hub.repos["org/G"].refs["main"]
    # the pulled file is kept by its tensors (gguf_layout.py): its quantized weights are
    # the very blobs of the conversion, which writes only its float tensors and configs
    pull = store.resolve(f"org/G@{commit}")
    assert store.db.execute("SELECT f.kind FROM files f JOIN snapshot_files sf ON sf.file_id = f.id "
                            "WHERE sf.snapshot_id = ? AND sf.path = ?", [pull, path.name]).fetchone() == ("gguf",)
    quantized = sum(t.nbytes for t in ours.state_dict().values() if isinstance(t, GGUFParameter))
    assert converted.status == "converted" and converted.reused_bytes >= quantized > 0
    assert converted.written_bytes < path.stat().st_size - quantized
    assert gguf_hub.served_files == [path.name]
    made = json.loads(store.read_file(store.resolve(f"org/G/{path.name}@{commit}#FluxTransformer2DModel"),
                                      "compstore_single_file.json"))
    assert (made["config"], made["config_inferred"], made["subfolder"]) == (inferred, True, "transformer")
    assert not list((store.home / "tmp").iterdir())  # the local copy went with the conversion
    [pulled] = [row for row in store.snapshot_files(pull) if row[0] == path.name]
    assert pulled[3] == path.stat().st_size  # the file itself, beside its conversion
    store.export(f"org/G@{commit}", tmp_path / "exported")  # rebuilt byte for byte (sha256 checked)
    assert (tmp_path / "exported" / path.name).read_bytes() == path.read_bytes()
    gguf_hub.reset_counts()
    monkeypatch.setattr(single_file, "_convert", lambda *a: pytest.fail("converted again"))
    monkeypatch.setattr(single_file.quantized_files, "read_gguf_header", lambda *a: pytest.fail("read the file again"))
    again = compstore.FluxTransformer2DModel.from_single_file(url, quantization_config=config, store=store)
    same_gguf_model(again, ours)
    assert gguf_hub.served_files == []
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = compstore.ingest_single_file(url, "FluxTransformer2DModel", store=store)
    assert (r.status, r.config) == ("unchanged", inferred)


def test_a_gguf_file_in_a_folder_is_kept_by_its_tensors_and_rebuilt_byte_for_byte(flux_gguf, tmp_path):
    """A `.gguf` the store ingests (a pulled repo's, any folder's) is kept as its header
    bytes and one piece per tensor, the padding after a tensor in its piece
    (gguf_layout.py): `export`, `verify` and a remote round trip give the file back
    byte for byte. A `.gguf` that does not read as GGUF is kept as one blob, as any
    file, not refused."""
    import shutil

    _, path, types = flux_gguf
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(path, repo / path.name)
    padded = syn.save_as_gguf({"odd": torch.randn(3), "w.weight": torch.randn(32, 32)}, repo / "padded.gguf",
                              {"w.weight": "Q8_0"})  # 12 bytes, then 20 of padding to the 32-byte alignment
    (repo / "not-gguf.gguf").write_bytes(b"GGUF" + bytes(60))
    store = compstore.Store(tmp_path / "store")
    store.ingest(repo, "repo")
    kinds = dict(store.db.execute("SELECT sf.path, f.kind FROM snapshot_files sf JOIN files f ON f.id = sf.file_id "
                                  "WHERE sf.snapshot_id = ?", [store.resolve("repo")]).fetchall())
    assert kinds == {path.name: "gguf", "padded.gguf": "gguf", "not-gguf.gguf": "raw"}
    pieces = dict(store.db.execute(
        "SELECT t.name, t.shape FROM files f JOIN file_tensors ft ON ft.file_id = f.id JOIN tensors t "
        "ON t.id = ft.tensor_id JOIN snapshot_files sf ON sf.file_id = f.id WHERE sf.path = ?",
        ["padded.gguf"]).fetchall())
    assert pieces == {"odd": "[32]", "w.weight": "[1088]"}  # 32 rows of one 34-byte Q8_0 block
    assert store.verify().ok
    remote = tmp_path / "remote"
    store.remote_add("r", remote.as_uri())
    store.push("repo")
    other = compstore.Store(tmp_path / "other")
    other.remote_add("r", remote.as_uri())
    other.fetch("repo")
    for s, out in ((store, tmp_path / "exported"), (other, tmp_path / "fetched")):
        s.export("repo", out)
        for name in (path.name, "padded.gguf", "not-gguf.gguf"):
            assert (out / name).read_bytes() == (repo / name).read_bytes(), name


def test_an_exported_gguf_model_loads_from_its_folder(flux_gguf, flux_store, tmp_path):
    """`export` writes the stored model (config.json with its GGUF quantization_config,
    the quantized bytes with their types in the safetensors metadata); compstore loads
    that folder as the stored model, alone or as a pipeline's transformer/. (diffusers'
    own from_pretrained does not load GGUF weights from a folder: docs/store-format.md,
    "GGUF files".)"""
    import shutil

    folders, path, _ = flux_gguf
    store = flux_store
    ref = compstore.ingest_single_file(path, "FluxTransformer2DModel", config="A", store=store).ref
    store.export(ref, tmp_path / "exported")
    other = compstore.Store(tmp_path / "other")
    config = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    loaded = compstore.FluxTransformer2DModel.from_pretrained(tmp_path / "exported", quantization_config=config,
                                                              store=other)
    same_gguf_model(loaded, theirs(flux_gguf, torch.bfloat16))
    # a pipeline folder whose transformer/ is such a model: its saved config (float32 compute)
    pipeline = tmp_path / "A-gguf"
    shutil.copytree(folders["A"], pipeline)
    shutil.rmtree(pipeline / "transformer")
    shutil.copytree(tmp_path / "exported", pipeline / "transformer")
    pipe = compstore.FluxPipeline.from_pretrained(pipeline, store=other)
    reference = theirs(flux_gguf, torch.float32)
    same_gguf_model(pipe.transformer, reference)
    plain = diffusers.FluxPipeline.from_pretrained(folders["A"], transformer=reference)
    assert (image(pipe) == image(plain)).all()


def test_bad_gguf_files_are_refused_and_leave_the_store_as_it_was(flux_gguf, flux_store, tmp_path, monkeypatch):
    """Each with an error that names the file and what is wrong, before anything is
    stored: not GGUF, truncated, empty, no tensors, a quantization type diffusers
    cannot dequantize, another model's weights, a quantization config that is not
    GGUF's, and no gguf package to read it with."""
    import sys

    import gguf
    from torchao.quantization import Int8WeightOnlyConfig

    folders, path, _ = flux_gguf
    store = flux_store
    data = path.read_bytes()
    files = {"magic-only": b"GGUF" + bytes(60), "truncated": data[: len(data) // 2], "header-only": data[:200],
             "text": b"not a gguf file\n" * 8, "empty": b""}
    for name, content in files.items():
        (tmp_path / f"{name}.gguf").write_bytes(content)
    writer = gguf.GGUFWriter(str(tmp_path / "no-tensors.gguf"), "flux")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    state = diffusers.FluxTransformer2DModel.from_pretrained(folders["B"] / "transformer").state_dict()
    syn.save_as_gguf({**state, "proj_out.weight": torch.randn(4, 256)}, tmp_path / "ternary.gguf",
                     {"proj_out.weight": "TQ1_0"})  # its blocks: 256 values
    vae = diffusers.AutoencoderKL.from_pretrained(folders["A"] / "vae").state_dict()
    syn.save_as_gguf(vae, tmp_path / "a-vae.gguf", {})
    before = store_state(store.home)
    cases = [(f"{name}.gguf", "not a readable GGUF file") for name in files] + [
        ("no-tensors.gguf", "holds no tensors"),
        ("ternary.gguf", r"tensor proj_out.weight is quantized as TQ1_0, which diffusers cannot dequantize; "
                         r"it can: .*Q4_K"),
        ("a-vae.gguf", "diffusers' FluxTransformer2DModel.from_single_file could not convert it"),
    ]
    config = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    for name, message in cases:
        with pytest.raises(compstore.InvalidInputError, match=f"{name}: {message}"):
            compstore.FluxTransformer2DModel.from_single_file(tmp_path / name, config="A", store=store,
                                                              quantization_config=config)
    with pytest.raises(compstore.CompstoreError, match="a GGUF file's weights are quantized already; pass "
                       r"GGUFQuantizationConfig\(compute_dtype=...\), or none"):
        compstore.FluxTransformer2DModel.from_single_file(path, config="A", store=store,
                                                          quantization_config=diffusers.TorchAoConfig(Int8WeightOnlyConfig()))
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    with pytest.raises(compstore.InvalidInputError, match=r"reading one takes the gguf package \(pip install"):
        compstore.FluxTransformer2DModel.from_single_file(path, config="A", store=store, quantization_config=config)
    assert store_state(store.home) == before


def _tampered(exported: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of an exported GGUF model folder, its weights file rewritten by
    `change(tensors, metadata)`."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path / name
    shutil.copytree(exported, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors, metadata)
    save_file(tensors, weights, metadata=metadata)
    return folder


def test_a_gguf_model_folder_not_as_its_metadata_says_is_refused_before_its_ingest(flux_gguf, flux_store,
                                                                                   tmp_path):
    """A folder whose config.json says GGUF (as `export` writes one) is checked before
    it is ingested: every weight its metadata names is there, uint8, of a type diffusers
    dequantizes, in whole blocks; the metadata is a JSON object. Each refusal names the
    weight and the fault, and the store is as it was."""
    _, path, types = flux_gguf
    store = flux_store
    ref = compstore.ingest_single_file(path, "FluxTransformer2DModel", config="A", store=store).ref
    store.export(ref, tmp_path / "exported")
    q8 = next(k for k, v in types.items() if v == "Q8_0")

    def retype(kind):
        return lambda tensors, metadata: metadata.update(
            gguf_quant_types=json.dumps({**json.loads(metadata["gguf_quant_types"]), q8: kind}))

    cases = {
        "missing": (lambda t, m: t.pop(q8), f"GGUF weight {q8} is not among its tensors"),
        "float": (lambda t, m: t.update({q8: t[q8].float()}), f"GGUF weight {q8} is torch.float32, not the uint8"),
        "ternary": (retype("TQ1_0"), f"GGUF weight {q8} names type 'TQ1_0', which diffusers cannot dequantize"),
        "no-such-type": (retype("Q9_9"), f"GGUF weight {q8} names type 'Q9_9'"),
        "partial-block": (lambda t, m: t.update({q8: t[q8][:, :-1].contiguous()}),
                          f"GGUF weight {q8} rows of 271 bytes are not whole Q8_0 blocks"),
        "not-json": (lambda t, m: m.update(gguf_quant_types="{"), "its gguf_quant_types metadata is not a JSON"),
        "no-types": (lambda t, m: m.pop("gguf_quant_types"), "its gguf_quant_types metadata is not a JSON"),
    }
    before = store_state(store.home)
    for name, (change, message) in cases.items():
        folder = _tampered(tmp_path / "exported", tmp_path, name, change)
        with pytest.raises(compstore.CompstoreError, match=message):
            compstore.FluxTransformer2DModel.from_pretrained(folder, store=store)
        assert store_state(store.home) == before, name


def test_weights_split_from_one_tensor_of_the_file_are_stored_each_with_its_bytes(flux_gguf, tmp_path):
    """diffusers' conversion of a Flux file in the original (BFL) layout splits each
    fused qkv weight into three views of one tensor; the converted model is saved
    with each weight's own bytes (safetensors writes views that do not overlap). Here
    the views are made by hand: the tiny Flux is too narrow for that conversion."""
    from compstore.loader import quantized_files

    model = theirs(flux_gguf, torch.float32)
    attn = model.transformer_blocks[0].attn
    q = attn.to_q.weight
    assert isinstance(q, GGUFParameter)  # to_k takes the second half: q's type, its shape
    fused = GGUFParameter(torch.cat([q.as_tensor(), torch.randint_like(q.as_tensor(), 0, 255)]),
                          quant_type=q.quant_type)
    attn.to_q.weight, attn.to_k.weight = torch.chunk(fused, 2)
    assert attn.to_q.weight.untyped_storage().data_ptr() == attn.to_k.weight.untyped_storage().data_ptr()
    quantized_files.save(model, tmp_path / "split", "gguf", {torch.float32})
    loaded = compstore.FluxTransformer2DModel.from_pretrained(tmp_path / "split",
                                                              store=compstore.Store(tmp_path / "store"))
    for name in ("to_q", "to_k"):
        ours, theirs_ = loaded.transformer_blocks[0].attn.get_submodule(name).weight, attn.get_submodule(name).weight
        assert ours.quant_type == theirs_.quant_type and torch.equal(ours.as_tensor(), theirs_.as_tensor())


def test_a_full_width_flux_gguf_in_the_original_layout_loads_as_diffusers_loads_it(tmp_path, monkeypatch):
    """The layout city96's FLUX.1 GGUF files have (q, k and v fused, BFL names), which
    diffusers converts at FLUX.1's width only: a 3072-wide transformer of one double
    and one single block (402 MiB as GGUF, Linear weights in three types). The stored
    conversion has diffusers' tensors, bytes and types, and its forward in bf16 gives
    diffusers' output bit for bit; a second call converts nothing."""
    from compstore.loader import single_file

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=128,
                                             num_attention_heads=24, joint_attention_dim=256,
                                             pooled_projection_dim=768, in_channels=64, guidance_embeds=True)
    model.save_config(tmp_path / "transformer")
    state = syn.flux_as_original_layout(model.state_dict(), 1, 1)
    del model
    linear = [k for k, v in state.items() if v.ndim == 2 and v.shape[1] % 32 == 0]
    path = syn.save_as_gguf(state, tmp_path / "flux1-bfl.gguf",
                            {k: ("Q8_0", "Q4_0", "Q5_1")[i % 3] for i, k in enumerate(linear)})
    del state
    config = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    reference = diffusers.FluxTransformer2DModel.from_single_file(str(path), config=str(tmp_path / "transformer"),
                                                                  quantization_config=config)
    store = compstore.Store(tmp_path / "store")
    ours = compstore.FluxTransformer2DModel.from_single_file(path, config=tmp_path / "transformer",
                                                             quantization_config=config, store=store)
    same_gguf_model(ours, reference)
    # split: each block's fused qkv into q, k and v, the single block's linear1 also into its MLP's
    assert sum(isinstance(t, GGUFParameter) for t in ours.state_dict().values()) == len(linear) + 2 * 2 + 3
    torch.manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, 8, 256, dtype=torch.bfloat16),
                  pooled_projections=torch.randn(1, 768, dtype=torch.bfloat16), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        assert torch.equal(ours(**inputs).sample, reference(**inputs).sample)
    del ours, reference
    monkeypatch.setattr(single_file, "_convert", lambda *a: pytest.fail("converted again"))
    compstore.FluxTransformer2DModel.from_single_file(path, config=tmp_path / "transformer",
                                                      quantization_config=config, store=store)


# BFL's fp8r and nvfp4 files

@pytest.fixture(scope="module")
def flux_bfl(flux_gguf, tmp_path_factory):
    """B's transformer as a BFL fp8r file and as an nvfp4 one (diffusers' layout)."""
    from safetensors.torch import save_file

    folders, _, _ = flux_gguf
    root = tmp_path_factory.mktemp("flux-bfl")
    state = diffusers.FluxTransformer2DModel.from_pretrained(folders["B"] / "transformer").state_dict()
    files = {}
    for scheme in ("fp8r", "nvfp4"):
        files[scheme] = root / f"flux-b-{scheme}.safetensors"
        save_file({k: v.contiguous() for k, v in syn.as_bfl_quantized(state, scheme).items()}, files[scheme])
    return folders, files


def bfl_theirs(flux_bfl, scheme, compute_dtype):
    folders, files = flux_bfl
    return diffusers.FluxTransformer2DModel.from_single_file(
        str(files[scheme]), config=str(folders["A"]), subfolder="transformer",
        quantization_config=diffusers.BFLQuantizationConfig(compute_dtype=compute_dtype))


def same_bfl_model(ours, theirs) -> None:
    """The same modules (BFL's quantized Linear layers where diffusers has them, with
    their compute dtype) and tensors: names, dtypes and bytes."""
    assert {n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in theirs.named_modules()}
    for (name, m), (_, t) in zip(ours.named_modules(), theirs.named_modules()):
        assert getattr(m, "compute_dtype", None) == getattr(t, "compute_dtype", None), name
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8),
                                                        b[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("scheme", ["fp8r", "nvfp4"])
def test_a_bfl_file_loads_as_diffusers_loads_it(flux_bfl, flux_store, scheme):
    """The same quantized Linear layers, weights, scales, float weights and image as
    diffusers' `from_single_file` of the file with a BFL config; converted once
    (float32 compute), loaded later in another compute dtype from the store, and from
    its ref with none (the saved config: bfloat16, BFL's default)."""
    folders, files = flux_bfl
    store = flux_store
    config = diffusers.BFLQuantizationConfig(compute_dtype=torch.bfloat16)
    ours = compstore.FluxTransformer2DModel.from_single_file(files[scheme], config="A", quantization_config=config,
                                                             store=store)
    reference = bfl_theirs(flux_bfl, scheme, torch.bfloat16)
    same_bfl_model(ours, reference)
    linear = type(ours.transformer_blocks[0].attn.to_q).__name__
    assert linear == {"fp8r": "BFLFP8RLinear", "nvfp4": "BFLNVFP4Linear"}[scheme]
    from click.testing import CliRunner

    from compstore.cli.main import cli

    out = CliRunner().invoke(cli, ["--store", str(store.home), "ingest-single-file", str(files[scheme]),
                                   "--class", "FluxTransformer2DModel", "--config", "A", "--bfl", "--json"])
    assert out.exit_code == 0, out.output
    r = compstore.ingest_single_file(files[scheme], "FluxTransformer2DModel", config="A", store=store,
                                     quantization_config=config)
    assert r.status == json.loads(out.output[out.output.index("{"):])["status"] == "unchanged"
    made = json.loads(store.read_file(r.snapshot, "compstore_single_file.json"))
    assert made["quantization"] == "bfl"
    stored = json.loads(store.read_file(r.snapshot, "config.json"))
    assert stored["quantization_config"] == {"quant_method": "bfl", "compute_dtype": "bfloat16"}
    same_bfl_model(compstore.load_component(r.ref, store=store), reference)
    wide = compstore.FluxTransformer2DModel.from_single_file(
        files[scheme], config="A", store=store,
        quantization_config=diffusers.BFLQuantizationConfig(compute_dtype=torch.float32))
    same_bfl_model(wide, bfl_theirs(flux_bfl, scheme, torch.float32))
    pipe = compstore.FluxPipeline.from_pretrained("A", transformer=ours, dtype=torch.bfloat16, store=store)
    plain = diffusers.FluxPipeline.from_pretrained(folders["A"], transformer=reference, dtype=torch.bfloat16)
    assert (image(pipe) == image(plain)).all()


def test_a_bfl_model_moves_through_a_pool_tensor_by_tensor_none_shared(flux_bfl, flux_store):
    """A BFL model holds torch's own tensors (fp8 weights, fp32 scales as buffers): a
    pool moves them as any model's, scales too, each load's its own (none is served as
    the store's: two loads' transformers share no device tensor)."""
    from test_residency import CountingCopier

    _, files = flux_bfl
    config = diffusers.BFLQuantizationConfig(compute_dtype=torch.bfloat16)
    pool = compstore.ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    models = []
    for _ in range(2):
        model = compstore.FluxTransformer2DModel.from_single_file(files["fp8r"], config="A",
                                                                  quantization_config=config, store=flux_store)
        [moved] = compstore.to_device(model, "meta", pool=pool).components
        assert moved.bytes_from_store == sum(t.nbytes for t in model.state_dict().values()) > 0
        assert moved.bytes_reused == 0
        assert model.transformer_blocks[0].attn.to_q.weight_scale.device.type == "meta"
        models.append(model)
    assert pool.copier.bytes == 2 * moved.bytes_from_store


def test_bad_bfl_files_are_refused_and_leave_the_store_as_it_was(flux_bfl, flux_gguf, flux_store, tmp_path):
    """A BFL config with a file that is not BFL's (no scales), a BFL file with a weight
    in the other scheme's dtype, a BFL file with no config (diffusers' conversion fails:
    the refusal says what to pass), a BFL config for a pipeline's file; and a stored
    folder (as `export` writes one) whose BFL weights lost a scale, refused before its
    ingest. Each names the file and the fault."""
    from safetensors.torch import load_file, save_file

    folders, files = flux_bfl
    store = flux_store
    plain = tmp_path / "plain.safetensors"
    state = diffusers.FluxTransformer2DModel.from_pretrained(folders["B"] / "transformer").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, plain)
    mixed = tmp_path / "mixed.safetensors"
    fp8r = load_file(files["fp8r"])
    q = next(k for k in fp8r if k.endswith(".weight_scale")).removesuffix("_scale")
    save_file({**fp8r, q: fp8r[q].view(torch.uint8)}, mixed)  # fp8r's scales, a uint8 weight
    config = diffusers.BFLQuantizationConfig(compute_dtype=torch.bfloat16)
    before = store_state(store.home)
    cases = [(plain, "The checkpoint has no `weight_scale` tensors"),
             (mixed, f"{q} is torch.uint8, but the fp8r layout expects torch.float8_e4m3fn")]
    for path, message in cases:
        with pytest.raises(compstore.InvalidInputError, match=f"{path.name}: diffusers' FluxTransformer2DModel"
                           f".from_single_file could not convert it .*{message}"):
            compstore.FluxTransformer2DModel.from_single_file(path, config="A", quantization_config=config,
                                                              store=store)
    with pytest.raises(compstore.InvalidInputError, match=r"could not convert it .*Its weights have scales "
                       r"\(\.weight_scale\): a BFL fp8r or nvfp4 file converts with quantization_config="
                       r"BFLQuantizationConfig\(\) \(CLI: --bfl\)"):
        compstore.FluxTransformer2DModel.from_single_file(files["nvfp4"], config="A", store=store)  # no config
    with pytest.raises(compstore.InvalidInputError, match="a BFL fp8r or nvfp4 checkpoint .* holds one model, "
                       "not a FluxPipeline"):
        compstore.ingest_single_file(files["fp8r"], "FluxPipeline", config="A", quantization_config=config,
                                     store=store)
    assert store_state(store.home) == before
    ref = compstore.ingest_single_file(files["fp8r"], "FluxTransformer2DModel", config="A", store=store,
                                       quantization_config=config).ref
    store.export(ref, tmp_path / "exported")
    weights = tmp_path / "exported" / "diffusion_pytorch_model.safetensors"
    saved = load_file(weights)
    save_file({k: v for k, v in saved.items() if k != q + "_scale"}, weights)
    before = store_state(store.home)
    with pytest.raises(compstore.CompstoreError, match=f"its tensors are not a BFL checkpoint's: {q} is "
                       f"torch.float8_e4m3fn, a quantized weight, with no {q}_scale"):
        compstore.FluxTransformer2DModel.from_pretrained(tmp_path / "exported", store=store)
    assert store_state(store.home) == before


def test_random_damage_to_a_gguf_header_is_refused_or_harmless(flux_gguf, flux_store, tmp_path):
    """1 to 4 random bytes of the file's first 4 KiB (its header and tensor table)
    changed, and one file in five cut short, for 40 seeds: each call ends in a load or a
    CompstoreError (no other exception), and a refusal leaves the store as it was.
    (An exploratory run of 150 seeds: 149 refused, 1 loaded.)"""
    import random

    _, path, _ = flux_gguf
    store = flux_store
    source = path.read_bytes()
    config = GGUFQuantizationConfig(compute_dtype=torch.float32)
    refused = 0
    for seed in range(40):
        rng = random.Random(seed)
        data = bytearray(source)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 4096))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        damaged = tmp_path / f"damaged-{seed}.gguf"
        damaged.write_bytes(bytes(data))
        before = store_state(store.home)
        try:
            compstore.FluxTransformer2DModel.from_single_file(damaged, config="A", quantization_config=config,
                                                              store=store)
        except compstore.CompstoreError:
            refused += 1
            assert store_state(store.home) == before, seed
    assert refused >= 30  # most damage to the header is damage diffusers' reader sees
