"""Every bad input gets a clear error naming the file, and leaves the store as it was."""

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import compstore
from compstore import InvalidInputError, PickleRefusedError
from compstore.cli import cli
from conftest import store_state

UNET = "unet/diffusion_pytorch_model.safetensors"


def rewrite_header(path: Path, mutate) -> None:
    """Load a safetensors header, let `mutate(header_dict)` change it, write it back."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def first_tensor(header: dict) -> dict:
    return min((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])


def _truncate(folder):
    p = folder / UNET
    p.write_bytes(p.read_bytes()[:-1000])


def _tiny_file(folder):
    (folder / UNET).write_bytes(b"\x01\x02\x03")


def _header_past_eof(folder):
    p = folder / UNET
    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])


def _non_json_header(folder):
    p = folder / UNET
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    p.write_bytes(data[:8] + b"{not json" + b" " * (n - 9) + data[8 + n :])


def _overlap(folder):
    def m(h):
        tensors = sorted((v for k, v in h.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
        a, b = tensors[0], tensors[1]
        # Point b at a's bytes; both keep a valid size for their shape.
        b.update(dtype=a["dtype"], shape=a["shape"], data_offsets=a["data_offsets"])
    rewrite_header(folder / UNET, m)


def _out_of_range(folder):
    def m(h):
        t = first_tensor(h)
        t["data_offsets"] = [t["data_offsets"][0] + 10**9, t["data_offsets"][1] + 10**9]
    rewrite_header(folder / UNET, m)


def _unknown_dtype(folder):
    rewrite_header(folder / UNET, lambda h: first_tensor(h).update(dtype="F13"))


def _shape_mismatch(folder):
    rewrite_header(folder / UNET, lambda h: first_tensor(h).update(shape=first_tensor(h)["shape"] + [3]))


def _index_dotdot(folder):
    idx = folder / "unet/diffusion_pytorch_model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "../vae/diffusion_pytorch_model.safetensors"}}))


def _index_absolute(folder):
    idx = folder / "unet/diffusion_pytorch_model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "/etc/passwd"}}))


def _index_missing_shard(folder):
    idx = folder / "unet/diffusion_pytorch_model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))


def _index_not_json(folder):
    (folder / "unet/diffusion_pytorch_model.safetensors.index.json").write_text("{oops")


def _symlink_out(folder):
    (folder / "unet" / "notes.txt").symlink_to("/etc/hostname")


def _dtype_not_a_string(folder):
    rewrite_header(folder / UNET, lambda h: first_tensor(h).update(dtype=["F16"]))


def _model_index_bad_types(folder):
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = [2**64 + 5, "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _model_index_not_json(folder):
    (folder / "model_index.json").write_text("[1, 2")


CASES = {
    "truncated": (_truncate, r"out of range \(data section is"),
    "shorter than 8 bytes": (_tiny_file, "shorter than the 8-byte header length"),
    "header length past end of file": (_header_past_eof, "runs past the end of the file"),
    "non-JSON header": (_non_json_header, "header is not valid JSON"),
    "overlapping offsets": (_overlap, "overlap"),
    "out-of-range offsets": (_out_of_range, "out of range"),
    "unknown dtype": (_unknown_dtype, "unknown dtype 'F13'"),
    "dtype not a string (found by the fuzzer)": (_dtype_not_a_string, r"unknown dtype \['F16'\]"),
    "model_index types (found by the fuzzer)": (_model_index_bad_types, "must be strings"),
    "shape x dtype != byte length": (_shape_mismatch, "but data_offsets span"),
    "'..' in index": (_index_dotdot, r"leaves the folder \('..' is not allowed\)"),
    "absolute path in index": (_index_absolute, "absolute or non-posix path"),
    "missing shard": (_index_missing_shard, "which is missing"),
    "index not JSON": (_index_not_json, "index is not valid JSON"),
    "symlink leaving the folder": (_symlink_out, "symlink points outside the input folder"),
    "model_index.json not JSON": (_model_index_not_json, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_store_unchanged(case, store, family, pipeline_copy):
    damage, message = CASES[case]
    store.ingest(family["B"], "B")  # a store with content in it
    before = store_state(store.home)
    folder = pipeline_copy("A")
    damage(folder)
    with pytest.raises(InvalidInputError, match=message) as e:
        store.ingest(folder, "A")
    assert str(e.value).count("\n") == 0
    assert store_state(store.home) == before


@pytest.mark.parametrize("case", ["truncated", "unknown dtype", "symlink leaving the folder"])
def test_cli_bad_input_is_one_line_and_nonzero(case, family, pipeline_copy, tmp_path):
    damage, message = CASES[case]
    folder = pipeline_copy("A")
    damage(folder)
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "ingest", str(folder)])
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.stderr


class Boom:
    """A pickle that would create a file if it were ever unpickled."""
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
def test_pickle_checkpoints_are_refused_and_never_loaded(suffix, store, pipeline_copy, tmp_path):
    folder = pipeline_copy("A")
    marker = tmp_path / "pickle-was-loaded"
    Boom.marker = marker
    (folder / "unet" / f"diffusion_pytorch_model{suffix}").write_bytes(pickle.dumps(Boom()))
    before = store_state(store.home)
    with pytest.raises(PickleRefusedError, match="pickle checkpoint refused.*--allow-pickle"):
        store.ingest(folder, "A")
    assert store_state(store.home) == before
    # Explicitly allowed: stored as opaque bytes, exported identically, never unpickled.
    store.ingest(folder, "A", allow_pickle=True)
    store.export("A", tmp_path / "out")
    assert (tmp_path / "out" / "unet" / f"diffusion_pytorch_model{suffix}").read_bytes() == \
        (folder / "unet" / f"diffusion_pytorch_model{suffix}").read_bytes()
    assert not marker.exists()


def test_exclude_leaves_files_out(store, pipeline_copy):
    folder = pipeline_copy("A")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04N.")
    r = store.ingest(folder, "A", exclude=["*.bin"])
    assert "unet/diffusion_pytorch_model.bin" not in {f["path"] for f in store.show("A")["files_list"]}
    assert r.files == 10


@pytest.mark.parametrize("name", ["", " leading", "trailing ", "tab\tname", "new\nline", "x" * 1025])
def test_bad_ref_names(name, store, family):
    before = store_state(store.home)
    with pytest.raises(InvalidInputError, match="invalid ref name"):
        store.ingest(family["A"], name)
    assert store_state(store.home) == before


def test_not_a_folder_and_empty_folder(store, tmp_path):
    before = store_state(store.home)
    with pytest.raises(InvalidInputError, match="not a directory"):
        store.ingest(tmp_path / "missing", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="holds no files"):
        store.ingest(tmp_path / "empty", "x")
    assert store_state(store.home) == before


def test_export_refuses_a_non_empty_target(store, family, tmp_path):
    from compstore import ExportError

    store.ingest(family["A"], "A")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        store.export("A", tmp_path / "t")
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["keep.txt"]


def test_unknown_ref_is_a_clear_cli_error(tmp_path):
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "show", "nope"])
    assert r.exit_code == 1 and "no ref named 'nope'" in r.stderr
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "diff", "a", "b", "--json"])
    assert r.exit_code == 1 and r.stdout == ""


def test_a_catalog_of_a_newer_schema_is_refused(store, family):
    from compstore import CompstoreError, Store

    store.ingest(family["A"], "A")
    store.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = store_state(store.home)
    with pytest.raises(CompstoreError, match="schema version 99 is not supported.*upgrade compstore"):
        Store(store.home)
    assert store_state(store.home) == before


@pytest.mark.parametrize("name", ["NoSuchPipeline", None, "AutoencoderKL"])
def test_a_pipeline_class_diffusers_lacks_is_a_clear_error(name, store, pipeline_copy):
    import compstore
    from compstore import CompstoreError

    folder = pipeline_copy("A")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = name
    (folder / "model_index.json").write_text(json.dumps(index))
    store.ingest(folder, "odd")
    before = store_state(store.home)
    with pytest.raises(CompstoreError, match=f"pipeline class {name!r}, which diffusers .* does not have"):
        compstore.DiffusionPipeline.from_pretrained("odd", store=store)
    assert store_state(store.home) == before


def test_a_model_of_the_repos_own_code_is_refused_before_the_ingest(store, pipeline_copy):
    """A repo whose UNet is its own class (`unet/my_unet.py`, which diffusers loads with
    trust_remote_code): a clear refusal that says what to do, the store as it was.
    (diffusers itself takes no such model passed in: "my_unet is not one of the
    libraries Diffusers can load components from".)"""
    import compstore
    from compstore import CompstoreError

    folder = pipeline_copy("A")
    (folder / "unet" / "my_unet.py").write_text(
        "from diffusers import UNet2DConditionModel\n\n\nclass MyUNet(UNet2DConditionModel):\n    pass\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    before = store_state(store.home)
    with pytest.raises(CompstoreError, match=r"unet: my_unet.MyUNet is not a class of diffusers .*"
                                             r"trust_remote_code.*load this pipeline with diffusers$"):
        compstore.DiffusionPipeline.from_pretrained(folder, store=store, trust_remote_code=True)
    assert store_state(store.home) == before


def test_a_config_that_disagrees_with_its_weights_is_a_clear_error(store, pipeline_copy):
    """A UNet config.json edited after the weights were saved (another conv_out
    width): the load names the tensor and both shapes instead of a torch traceback."""
    import compstore
    from compstore import CompstoreError

    folder = pipeline_copy("A")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["out_channels"] = config["out_channels"] * 2
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    store.ingest(folder, "odd")
    before = store_state(store.home)
    with pytest.raises(CompstoreError, match=r"tensor 'conv_out\.(weight|bias)' is \(.*\) in the store but "
                                             r"\(.*\) in the UNet2DConditionModel.*disagree"):
        compstore.DiffusionPipeline.from_pretrained("odd", store=store)
    assert store_state(store.home) == before and store.verify().ok


@pytest.mark.parametrize("load, message", [
    (lambda c, folder, store: c.load_component(folder, "unet", variant="fp16", store=store),
     "slot 'unet' has no 'fp16' weights"),
    (lambda c, folder, store: c.load_component(folder, "nothing", store=store),
     r"no component in slot 'nothing' \(slots: \['scheduler', 'text_encoder'"),
    (lambda c, folder, store: c.DiffusionPipeline.from_pretrained(folder, variant="fp16", store=store),
     "has no 'fp16' weights"),
], ids=["component variant", "component slot", "pipeline variant"])
def test_a_refused_load_of_a_folder_leaves_the_store_as_it_was(load, message, store, family):
    """A folder is ingested on the way to a load, but not when the load is refused
    for what the folder lacks: the check runs on the folder first."""
    import compstore

    before = store_state(store.home)
    with pytest.raises(compstore.ComponentNotFoundError, match=message):
        load(compstore, str(family["A"]), store)
    assert store_state(store.home) == before and store.ls() == []


def test_a_quantization_config_that_cannot_load_fails_as_diffusers_fails_before_any_ingest(store, family):
    """A bitsandbytes config where diffusers cannot quantize with it (bitsandbytes not
    installed, or no GPU): the library's own error, raised before the folder is
    ingested; a GGUF config (it loads GGUF files, and these weights are not one) and
    one of no quantization method: a CompstoreError that says what to do. Each leaves
    the store as it was (a working one: tests/test_quantized.py)."""
    import re

    import diffusers
    from diffusers import GGUFQuantizationConfig
    from diffusers.quantizers import PipelineQuantizationConfig

    import compstore

    bnb = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_4bit": True},
                                     components_to_quantize=["unet"])
    try:
        diffusers.DiffusionPipeline.from_pretrained(family["A"], quantization_config=bnb)
        theirs = None
    except Exception as e:  # not installed here (ImportError); installed, no GPU (RuntimeError)
        theirs = e
    before = store_state(store.home)
    if theirs is not None:
        with pytest.raises(type(theirs), match=re.escape(str(theirs))):
            compstore.DiffusionPipeline.from_pretrained(str(family["A"]), store=store, quantization_config=bnb)
    with pytest.raises(compstore.CompstoreError, match=r"A/unet: a GGUF quantization config loads a GGUF "
                       r"checkpoint \(\.gguf\), and these weights are not one: pass the file to the model "
                       r"class's from_single_file"):
        compstore.load_component(str(family["A"]), "unet", store=store,
                                 quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    with pytest.raises(compstore.CompstoreError, match="is not a quantization config"):
        compstore.load_component(str(family["A"]), "unet", store=store, quantization_config={"bits": 4})
    assert store_state(store.home) == before and store.ls() == []
    compstore.DiffusionPipeline.from_pretrained(str(family["A"]), store=store, quantization_config=None)


@pytest.mark.parametrize("saved, error, message", [
    ({"load_in_4bit": True}, compstore.CompstoreError,
     r"copy-A/unet: the quantization_config of its config.json names no quant_method"),
    ({"quant_method": "no-such-method"}, ValueError, r"Unknown quantization type, got no-such-method"),
], ids=["no method", "an unknown method"])
def test_a_model_saved_quantized_that_no_library_loads_is_refused_before_its_ingest(store, pipeline_copy, saved,
                                                                                   error, message):
    """A model whose config.json's `quantization_config` names no method, or one no
    library knows: a folder is refused before its ingest (the library's own error for
    the unknown one), a stored ref at the build. Passed in, or another slot, it loads."""
    folder = pipeline_copy("A")
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "quantization_config": saved}))
    before = store_state(store.home)
    with pytest.raises(error, match=message):
        compstore.DiffusionPipeline.from_pretrained(str(folder), store=store)
    with pytest.raises(error, match=message):
        compstore.load_component(str(folder), "unet", store=store)
    assert store_state(store.home) == before and store.ls() == []

    vae = compstore.load_component(str(folder), "vae", store=store)  # another slot: loads
    unet = compstore.load_component(str(pipeline_copy("B")), "unet", store=store)
    pipe = compstore.DiffusionPipeline.from_pretrained(str(folder), store=store, unet=unet)
    assert pipe.unet is unet and torch.equal(pipe.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)

    store.ingest(folder, "quantized")  # the store holds it as published ...
    before = store_state(store.home)
    with pytest.raises(error, match=message.replace("copy-A", "quantized")):
        compstore.DiffusionPipeline.from_pretrained("quantized", store=store)  # ... and builds none of it
    assert store_state(store.home) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="bitsandbytes loads where a GPU is")
def test_a_model_saved_with_bitsandbytes_is_refused_without_a_gpu_as_diffusers_refuses_it(store, pipeline_copy):
    """diffusers loads a bitsandbytes model on a GPU only, with bitsandbytes installed:
    here, diffusers' own error ("No GPU found", or bitsandbytes' absence), before the
    folder is ingested."""
    import diffusers

    folder = pipeline_copy("A")
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    with pytest.raises(Exception) as theirs:
        diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    before = store_state(store.home)
    with pytest.raises(Exception) as ours:
        compstore.DiffusionPipeline.from_pretrained(str(folder), store=store)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))
    assert "bitsandbytes" in str(ours.value) or "No GPU found" in str(ours.value)
    assert store_state(store.home) == before


def test_an_error_naming_input_with_a_newline_stays_one_line(tmp_path):
    from compstore import Store

    Store(tmp_path / "s").close()
    before = store_state(tmp_path / "s")
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "show", "a\nb"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "'a\\nb'" in r.stderr
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "pull", "x\ny", "--all", "--variant", "fp16"])
    assert r.exit_code == 1 and r.stderr == ("Error: pull x\\ny: all_files (--all) takes every variant as "
                                             "published; leave out variant='fp16', or all_files to pull "
                                             "that variant\n")
    assert store_state(tmp_path / "s") == before


def test_a_folder_that_is_no_pipeline_or_an_empty_name_is_refused_before_it_is_read(store, tmp_path):
    """`from_pretrained("")` named the working folder, and a folder of other files (a
    home folder, "/") was walked and ingested before the load found no model_index.json."""
    import compstore

    junk = tmp_path / "junk"
    (junk / "sub").mkdir(parents=True)
    (junk / "notes.txt").write_text("x")
    (junk / "sub" / "data.bin2").write_bytes(b"y")
    before = store_state(store.home)
    for load, message in [
        (lambda: compstore.DiffusionPipeline.from_pretrained(str(junk), store=store),
         "junk: not a diffusers pipeline folder: it holds no model_index.json$"),
        (lambda: compstore.ModularPipeline.from_pretrained(str(junk), store=store),
         "it holds no modular_model_index.json or model_index.json"),
        (lambda: compstore.DiffusionPipeline.from_pretrained("", store=store), "'': an empty name"),
        (lambda: compstore.load_component(" ", "unet", store=store), "' ': an empty name"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            load()
    with pytest.raises(InvalidInputError, match=r"'': an empty path: name the folder \(\".\" for this one\)"):
        store.ingest("", "x")
    (junk / "modular_model_index.json").write_text("{}")
    with pytest.raises(InvalidInputError, match=r"\(it is a modular pipeline: use compstore.ModularPipeline\)"):
        compstore.DiffusionPipeline.from_pretrained(str(junk), store=store)
    assert store_state(store.home) == before and store.ls() == []


def test_odd_load_arguments_are_clear_errors(family_store):
    """Found by an exploratory run of odd `from_pretrained` arguments: each ended in a
    torch or Python error from deep inside (NotImplementedError from the MPS backend,
    "Only Tensors of floating point ... can require gradients", AttributeError)."""
    import compstore

    before = store_state(family_store.home)
    cases = [({"dtype": torch.int8}, "dtype=torch.int8 is not a floating-point dtype"),
             ({"pool": "x"}, "pool='x' is not a ResidencyPool")]
    if not torch.backends.mps.is_available():
        cases.append(({"device_map": "mps"}, "device_map='mps' is not a device this torch can use"))
    for kwargs, message in cases:
        with pytest.raises(compstore.CompstoreError, match=message):
            compstore.DiffusionPipeline.from_pretrained("A", store=family_store, **kwargs)
    assert store_state(family_store.home) == before


@pytest.mark.parametrize("holding", ["a file", "a tmp/ of its own"])
def test_a_new_store_is_not_made_in_a_folder_holding_other_files(tmp_path, holding):
    """`--store ~/work` by mistake: the store empties its tmp/ of what it did not write,
    so a store made there would have deleted the user's tmp/ files at its first
    ingest. A new store goes into a new or empty folder (a volume's lost+found and
    hidden files aside); the folder is left as it was."""
    from compstore import CompstoreError, Store

    home = tmp_path / "work"
    (home / "tmp").mkdir(parents=True)
    (home / ".hidden").write_text("x")
    (home / ("notes.txt" if holding == "a file" else "tmp/notes.txt")).write_text("mine")
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    with pytest.raises(CompstoreError, match="not a compstore store .*holds other files .*notes.txt"):
        Store(home)
    r = CliRunner().invoke(cli, ["--store", str(home), "ls"])
    assert r.exit_code == 1 and "a new store needs a new or empty folder" in r.stderr
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == before
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CompstoreError, match="is a file, not a store folder"):
        Store(tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "x"
    (tmp_path / "volume" / "lost+found").mkdir(parents=True)
    Store(tmp_path / "volume").close()  # a fresh volume's root holds lost+found: a store goes there


def test_an_export_into_the_store_folder_is_refused(family_store):
    """The store's folder is the store's: an export into its tmp/ was deleted by the
    next ingest."""
    from compstore import ExportError
    from conftest import store_state

    before = store_state(family_store.home)
    for dest in (family_store.home / "tmp" / "A", family_store.home / "A"):
        with pytest.raises(ExportError, match="inside the store folder"):
            family_store.export("A", dest)
        assert not dest.exists()
    assert store_state(family_store.home) == before
