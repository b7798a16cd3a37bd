"""Settings from `COMPSTORE_*` environment variables: read when used, and a value
that cannot be used is a one-line `SettingError` naming the variable, with the
store left as it was."""

import pytest
from click.testing import CliRunner
from conftest import store_state

import compstore
from compstore.cli.main import cli
from compstore.loader.upload import Uploader
from compstore.store.remote import Remote
from compstore import SettingError
from compstore.store.settings import env_setting


def test_env_setting_takes_the_default_a_value_or_refuses(monkeypatch):
    monkeypatch.delenv("COMPSTORE_TEST_SETTING", raising=False)
    assert env_setting("COMPSTORE_TEST_SETTING", 7) == 7
    for raw, value in (("", 7), ("  ", 7), ("3", 3), (" 12 ", 12)):
        monkeypatch.setenv("COMPSTORE_TEST_SETTING", raw)
        assert env_setting("COMPSTORE_TEST_SETTING", 7) == value
    monkeypatch.setenv("COMPSTORE_TEST_SETTING", "2.5")
    assert env_setting("COMPSTORE_TEST_SETTING", 1.0, float, expected="seconds") == 2.5
    monkeypatch.setenv("COMPSTORE_TEST_SETTING", "nan")
    with pytest.raises(SettingError, match="^COMPSTORE_TEST_SETTING='nan': expected seconds"):
        env_setting("COMPSTORE_TEST_SETTING", 1.0, float, expected="seconds")
    for raw in ("many", "2.5", "-1"):
        monkeypatch.setenv("COMPSTORE_TEST_SETTING", raw)
        with pytest.raises(SettingError, match=rf"^COMPSTORE_TEST_SETTING='{raw}': expected a whole "
                                               "number, at least 0; set it so, or unset it"):
            env_setting("COMPSTORE_TEST_SETTING", 7)


@pytest.mark.parametrize("name, raw, budget", [
    ("COMPSTORE_VRAM_BUDGET", "10GiB", 10 << 30), ("COMPSTORE_VRAM_BUDGET", "123", 123),
    ("COMPSTORE_PINNED_BUDGET", "500MB", 500_000_000), ("COMPSTORE_PINNED_BUDGET", "0", 0)])
def test_budgets_take_bytes_or_a_size(monkeypatch, name, raw, budget):
    monkeypatch.setenv(name, raw)
    pool = compstore.ResidencyPool("cpu")
    assert (pool.budget_bytes if name == "COMPSTORE_VRAM_BUDGET" else pool.pinned_budget_bytes) == budget


@pytest.mark.parametrize("device", ["cuda", "xpu", "mps", "cpu"])
def test_the_default_budget_is_half_the_free_memory_the_backend_tells(monkeypatch, device):
    """CUDA's and XPU's `mem_get_info`; MPS: its recommended working set less what its
    driver holds (until 2026-12-07 every device but CUDA had an unlimited budget, so a
    Mac kept every dropped pipeline's tensors); the host: unlimited. The backends are
    stand-ins here: this machine has none of those devices."""
    import torch

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda device=None: (4 * gib, 64 * gib), raising=False)
    monkeypatch.setattr(torch.xpu, "current_device", lambda: 0, raising=False)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 20 * gib)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 8 * gib)
    expected = {"cuda": 3 * gib, "xpu": 2 * gib, "mps": 6 * gib, "cpu": 1 << 62}[device]
    assert compstore.ResidencyPool(device).budget_bytes == expected


@pytest.mark.parametrize("name", ["COMPSTORE_VRAM_BUDGET", "COMPSTORE_PINNED_BUDGET"])
@pytest.mark.parametrize("raw", ["lots", "-5", "10 parsecs"])
def test_a_budget_that_is_no_size_is_a_setting_error(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SettingError, match=rf"^{name}='{raw}': expected bytes or a size such as \"10GiB\""):
        compstore.ResidencyPool("cpu")


@pytest.mark.parametrize("argument", ["budget_bytes", "pinned_budget_bytes"])
def test_a_negative_budget_argument_is_refused(argument):
    with pytest.raises(compstore.CompstoreError, match=rf"^{argument}=-1: a budget is 0 bytes or more"):
        compstore.ResidencyPool("cpu", **{argument: -1})


def test_a_negative_pinned_budget_set_later_is_refused_and_changes_nothing():
    import torch

    pool = compstore.ResidencyPool("cpu", budget_bytes=0, pinned_budget_bytes=1 << 20)
    pool._tier.keep([("k", torch.ones(4))])
    with pytest.raises(compstore.CompstoreError, match="^pinned_budget_bytes=-1: a budget is 0 bytes or more"):
        pool.pinned_budget_bytes = -1
    assert pool.pinned_budget_bytes == 1 << 20 and "k" in pool._tier and pool.pinned_bytes == 1 << 20


def test_upload_readers_from_the_variable_or_refused(monkeypatch):
    monkeypatch.setenv("COMPSTORE_UPLOAD_READERS", "3")
    up = Uploader("cpu")
    assert up.readers == 3
    up.close()
    for raw in ("x", "-2"):
        monkeypatch.setenv("COMPSTORE_UPLOAD_READERS", raw)
        with pytest.raises(SettingError, match="^COMPSTORE_UPLOAD_READERS="):
            Uploader("cpu")
    with pytest.raises(compstore.CompstoreError, match="^readers=-1: an upload needs at least 1 reader"):
        Uploader("cpu", readers=-1)


def test_a_bad_lock_timeout_fails_the_ingest_and_leaves_the_store_as_it_was(store, family, monkeypatch):
    store.ingest(family["B"], "B")
    before = store_state(store.home)
    monkeypatch.setenv("COMPSTORE_LOCK_TIMEOUT", "soon")
    r = CliRunner().invoke(cli, ["--store", str(store.home), "ingest", str(family["A"]), "--name", "A"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("Error: COMPSTORE_LOCK_TIMEOUT='soon': expected seconds, at least 0")
    assert store_state(store.home) == before


def test_a_bad_lease_time_fails_the_push_before_the_remote_is_written(store, family, tmp_path, monkeypatch):
    store.ingest(family["B"], "B")
    monkeypatch.setenv("COMPSTORE_REMOTE_LEASE_S", "forever")
    with pytest.raises(SettingError, match="^COMPSTORE_REMOTE_LEASE_S='forever': expected seconds"):
        store.push("B", to=str(tmp_path / "remote"))
    assert not (tmp_path / "remote").exists() or Remote(str(tmp_path / "remote")).refs() == {}
