"""Random sequences of switches through one residency pool, each step checked against
plain diffusers.

A pool with CPU memory as its device, under a budget that holds about one pipeline
and a pinned tier that holds less, so that loads reuse, evict, re-upload from the
tier and from the store. Every live pipeline has a twin: the same pipeline loaded by
plain diffusers, to which every step does what it does to ours (a cast there and
back, components passed between pipelines, in-place edits of private copies). After
each step the weights of every pipeline equal its twin's, bit for bit, and now and
then its image does too. Steps also add, fuse, unfuse and unload LoRAs, add tokens
(a textual inversion's resized embedding), load state dicts into a model or one of its
submodules, and stage a load's delta in the pinned tier before its move (`pool.stage`).
An in-place edit of a shared (pooled) tensor reaches the live pipelines that share it,
as the pool documents; from then on those are not compared, but every later load must
get the store's bytes again.
"""

import gc
import random

import diffusers
import numpy as np
import pytest
import torch

import compstore
from compstore import ResidencyPool, to_device
from conftest import run_random_steps, store_state

MODELS = ("unet", "vae", "text_encoder")
NAMES = "ABCD"  # C shares two thirds of A's UNet; D's default weights are A's, but
# its text encoder's config says float16 (dtype None loads it so): loaded as float32
DTYPES = {"D": torch.float32}


def image(pipe) -> np.ndarray:
    return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", height=32, width=32).images


class Live:
    """A pipeline of ours and its diffusers twin."""

    def __init__(self, name: str, ours, twin, private: bool):
        self.name, self.ours, self.twin, self.private = name, ours, twin, private
        self.compared = True  # False once a shared tensor of it was edited in place

    def assert_same_weights(self) -> None:
        for slot in MODELS:
            a, b = getattr(self.ours, slot).state_dict(), getattr(self.twin, slot).state_dict()
            assert a.keys() == b.keys(), (self.name, slot)
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (self.name, slot, k)


def model_bytes(pipe) -> int:
    return sum(t.numel() * t.element_size() for slot in MODELS
               for t in [*getattr(pipe, slot).parameters(), *getattr(pipe, slot).buffers()])


class Sequence:
    def __init__(self, store, family, seed: int, device: str):
        self.store, self.family, self.rng, self.device = store, family, random.Random(seed), device
        one = model_bytes(diffusers.StableDiffusionPipeline.from_pretrained(family["A"]))
        self.pool = ResidencyPool(device, budget_bytes=one // 2, pinned_budget_bytes=one // 2)
        self.live: list[Live] = []
        self.log: list[str] = []  # the steps so far: the failure message names them
        self.moved = {"reused": 0, "from pinned": 0, "from store": 0}  # what the loads did, in all

    def twin(self, name: str, **components):
        return diffusers.StableDiffusionPipeline.from_pretrained(self.family[name], dtype=DTYPES.get(name),
                                                                 **components).to(self.device)

    def ours(self, name: str, **kwargs):
        return compstore.DiffusionPipeline.from_pretrained(name, store=self.store, dtype=DTYPES.get(name),
                                                           **kwargs)

    # -- the steps -------------------------------------------------------------------
    def load(self) -> None:
        """A load onto the pool's device (or a CPU load moved there), maybe private."""
        name, private = self.rng.choice(NAMES), self.rng.random() < 0.25
        moved_after = self.rng.random() < 0.3
        staged = moved_after and not private and self.rng.random() < 0.5
        self.log.append(f"load {name} private={private} moved_after={moved_after} staged={staged}")
        if moved_after:
            ours = self.ours(name, private=private)
            if staged:  # its delta copied into the pinned tier first (`pool.stage`)
                staged_bytes = self.pool.stage(ours)
                assert self.pool.pinned_bytes <= self.pool.pinned_budget_bytes
                assert staged_bytes == 0 or self.pool.pinned_bytes > 0, staged_bytes
            report = to_device(ours, self.device, pool=self.pool, private=private)
            if staged and staged_bytes:
                assert report.bytes_from_pinned > 0, (staged_bytes, str(report))
        else:
            ours = self.ours(name, pool=self.pool, private=private)
            report = compstore.last_transfer()
        moved = report.bytes_reused + report.bytes_uploaded
        moved_now = (report.bytes_reused, report.bytes_from_pinned, report.bytes_from_store)
        for what, n in zip(self.moved, moved_now):
            self.moved[what] += n
        assert moved <= model_bytes(ours) and (private or moved > 0.99 * model_bytes(ours))
        if private:
            assert report.bytes_reused == 0
        self.live.append(Live(name, ours, self.twin(name), private))
        self.assert_settled()

    def load_passing(self) -> None:
        """A load given a live pipeline's component, as the expert switch does."""
        if not self.live:
            return self.load()
        giver, slot, name = self.rng.choice(self.live), self.rng.choice(["vae", "text_encoder"]), \
            self.rng.choice(NAMES)
        self.log.append(f"load {name} with {slot} of a live {giver.name}")
        ours = self.ours(name, pool=self.pool, **{slot: getattr(giver.ours, slot)})
        twin = self.twin(name, **{slot: getattr(giver.twin, slot)})
        live = Live(name, ours, twin, private=False)  # its own models are the pool's
        live.compared = giver.compared
        self.live.append(live)
        self.assert_settled()

    def drop(self) -> None:
        if self.live:
            dropped = self.live.pop(self.rng.randrange(len(self.live)))
            collect = self.rng.random() < 0.5
            self.log.append(f"drop {dropped.name} collect={collect}")
            del dropped
            if collect:
                gc.collect()

    def cast_there_and_back(self) -> None:
        """fp16 and back: new bytes (fp32 -> fp16 loses bits), never the store's."""
        if self.live:
            live = self.rng.choice(self.live)
            self.log.append(f"cast {live.name} to fp16 and back")
            for pipe in (live.ours, live.twin):
                pipe.to(torch.float16)
                pipe.to(torch.float32)

    def edit(self) -> None:
        """An in-place edit: of a private copy, only that pipeline (and the twin)
        changes; of a pooled tensor, every live pipeline sharing it may."""
        if not self.live:
            return
        live = self.rng.choice(self.live)
        slot = self.rng.choice(MODELS)
        name, _ = self.rng.choice(sorted(getattr(live.ours, slot).named_parameters()))
        self.log.append(f"edit {live.name}.{slot}.{name} private={live.private}")
        with torch.no_grad():
            for pipe in (live.ours, live.twin):
                getattr(pipe, slot).get_parameter(name).mul_(1.5)
        if not live.private:
            for other in self.live:
                if not other.private:
                    other.compared = False

    def load_weights(self) -> None:
        """`model.load_state_dict(...)` of other weights for some of a live pipeline's
        tensors, or a submodule's of its own: copied into copies of its own, the other
        live pipelines sharing them keep the store's and go on being compared with
        their twins."""
        if not self.live:
            return
        live = self.rng.choice(self.live)
        slot, seed = self.rng.choice(MODELS), self.rng.randrange(1 << 16)
        subs = sorted(n for n, m in getattr(live.ours, slot).named_modules() if n and m._parameters)
        sub = self.rng.choice(subs) if self.rng.random() < 0.5 else ""  # "": the model's own
        names = sorted(getattr(live.ours, slot).get_submodule(sub).state_dict())
        picked = self.rng.sample(names, max(1, len(names) // 4))
        self.log.append(f"load_state_dict of {len(picked)} {slot}.{sub} tensors ({seed}) into {live.name}")
        for pipe in (live.ours, live.twin):
            model = getattr(pipe, slot).get_submodule(sub)
            torch.manual_seed(seed)
            weights = model.state_dict()
            model.load_state_dict({k: weights[k] * (1 + 0.01 * torch.randn_like(weights[k].float())).to(
                weights[k].dtype) if weights[k].is_floating_point() else weights[k] for k in picked}, strict=False)

    def lora(self) -> None:
        """A random LoRA on a live pipeline's UNet (peft renames the layers it wraps,
        which stay the store's); or the one it has fused into its weights (into
        copies of its own: the other live pipelines sharing those layers go on
        being compared with their twins), unfused, or unloaded."""
        from peft import LoraConfig

        if not self.live:
            return
        live = self.rng.choice(self.live)
        if getattr(live.ours.unet, "peft_config", None):
            action = self.rng.choice(["fuse", "unfuse", "unload"])
            self.log.append(f"{action} the LoRA of {live.name}")
            for pipe in (live.ours, live.twin):
                if action == "unload":
                    pipe.unload_lora_weights()
                else:
                    getattr(pipe, f"{action}_lora")(components=["unet"])
            self.move_again(live)
            return
        seed, fuse = self.rng.randrange(1 << 16), self.rng.random() < 0.5
        self.log.append(f"LoRA {seed} on {live.name} fused={fuse}")
        for pipe in (live.ours, live.twin):
            torch.manual_seed(seed)
            pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                             init_lora_weights=False))
            if fuse:
                pipe.fuse_lora(components=["unet"])
        self.move_again(live)

    def new_token(self) -> None:
        """A textual inversion: a token added, the text encoder's embedding resized (a
        new tensor in the stored one's place) and its row set through `.data`."""
        if not self.live:
            return
        live = self.rng.choice(self.live)
        self.log.append(f"new token for {live.name}")
        for pipe in (live.ours, live.twin):
            pipe.tokenizer.add_tokens([f"<t{len(pipe.tokenizer)}>"])
            pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
            pipe.text_encoder.get_input_embeddings().weight.data[-1] = 0.5
        self.move_again(live)

    def move_again(self, live: Live | None = None) -> None:
        """A live pipeline (`live`, half the time) moved to the device again, as an
        offload hook's or a user's round trip does: what is still the store's is
        reused, the rest kept as it is."""
        if live is None and self.live:
            live = self.rng.choice(self.live)
        elif self.rng.random() < 0.5:
            return
        if live is not None:
            self.log.append(f"move {live.name} again")
            to_device(live.ours, self.device, pool=self.pool, private=live.private)
            self.assert_settled()

    def trim(self) -> None:
        keep = self.rng.choice([0, self.pool.budget_bytes // 2])
        self.log.append(f"trim to {keep}")
        self.pool.trim(keep)
        assert self.pool.idle_bytes <= keep

    # -- the checks ------------------------------------------------------------------
    def assert_settled(self) -> None:
        """What a load leaves: idle bytes within the budget, the tier within its own."""
        assert self.pool.idle_bytes <= self.pool.budget_bytes
        assert self.pool.pinned_bytes <= self.pool.pinned_budget_bytes

    def check(self, images: bool) -> None:
        for live in self.live:
            if live.compared:
                live.assert_same_weights()
        if images:
            compared = [live for live in self.live if live.compared]
            if compared:
                live = self.rng.choice(compared)
                np.testing.assert_array_equal(image(live.ours), image(live.twin), err_msg=live.name)


def run(store, family, seed: int, device: str = "cpu", steps: int = 48) -> None:
    """`steps` random steps on `device` (tests/test_cuda.py runs them on a GPU)."""
    seq = Sequence(store, family, seed, device)
    before = store_state(store.home)
    choices = [seq.load] * 4 + [seq.load_passing] + [seq.drop] * 3 + [seq.cast_there_and_back, seq.edit,
                                                                    seq.trim, seq.lora, seq.new_token,
                                                                    seq.move_again, seq.load_weights]
    run_random_steps(seq.rng, choices, steps, seq.log, lambda i: seq.check(images=i % 5 == 4),
                     f"seed {seed}, ")
    assert all(seq.moved.values()), seq.moved  # every way to the device was taken
    seq.live.clear()
    gc.collect()
    seq.pool.trim(0)
    assert seq.pool.resident_bytes == 0
    assert store_state(store.home) == before and store.verify().ok


# Seeds 2, 8 and 15 never upload from the pinned tier (`run`'s last check). Of these,
# 5 and 9 fail with fuse_lora's copy-on-write undone; 0, 5, 9 and 13 with
# load_state_dict's; 9 and 13 with it for models only (a submodule's unseen, as before
# 2026-12-07); 5, 7, 9 and 13 with `stage` not copying what it reserves.
@pytest.mark.parametrize("seed", [0, 5, 7, 9, 13])
def test_random_switch_sequences_match_plain_diffusers(family_store, family, seed):
    run(family_store, family, seed)
