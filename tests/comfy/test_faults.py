"""Things that go wrong mid-run, in a real ComfyUI (tiny SD1.5 checkpoint, fp32 on CPU).

Fault injection, into our own pipeline only (ComfyUI is not mocked): out of memory is raised by a
forward pre-hook on a layer of the real UNet; a full disk by replacing safetensors' writer with
one that writes half the file and then fails with ENOSPC. An unwritable folder is real: a file
sits where the folder should be (root ignores chmod).
"""
from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch

from .test_train import (CAPTIONS, checkpoint, clip_outputs, dataset, loaded, pattern_images, probe,  # noqa: F401
                         rates, read_lora, schedule, stock_lora_loader, train, unet_outputs)

UNET_ONLY = dict(learning_rate=1e-3, text_encoder_lr=0.0)


def loras(comfy) -> Path:
    return comfy.models_dir / "loras"


def leftovers(comfy) -> list[str]:
    """Temp files anywhere under models/loras and output/lora_lab (none may survive a failure)."""
    return [path.name for folder in (loras(comfy), comfy.output_dir / "lora_lab")
            for path in folder.rglob(".lora_lab_*")]


def assert_models_restored(comfy, loaded, probe, before) -> None:  # noqa: F811
    latent, context = probe
    model, clip, _ = loaded
    assert torch.equal(unet_outputs(model, latent, context), before[0])
    assert torch.equal(clip_outputs(clip), before[1])
    assert not any("lora_" in name for name, _ in model.model.diffusion_model.named_parameters())


@pytest.fixture
def before(loaded, probe):  # noqa: F811
    latent, context = probe
    return unet_outputs(loaded[0], latent, context), clip_outputs(loaded[1])


def test_out_of_memory_mid_run_names_what_to_lower_keeps_the_partial_lora_and_restores(comfy, loaded, dataset,  # noqa: F811
                                                                                         probe, before):
    """The first layer of the UNet's middle block raises torch.OutOfMemoryError in the forward pass of step 2
    (ComfyUI calls the layers of a block, not the block, so the hook sits on the layer)."""
    calls = [0]

    def run_out_of_memory(module, arguments):
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    handle = loaded[0].model.diffusion_model.middle_block[0].register_forward_pre_hook(run_out_of_memory)
    try:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            train(comfy, loaded, dataset, rates(comfy, **UNET_ONLY), schedule(comfy), steps=5,
                  lora_name="out_of_memory")
    finally:
        handle.remove()
    message = str(caught.value)
    for fragment in ("ran out of memory at step 2", "batch_size (now 2", "resolution (now 64)",
                     "turn gradient_checkpointing on", "rank (now 4)", "saved as out_of_memory_interrupted"):
        assert fragment in message, (fragment, message)
    _, _, log_lines = stock_lora_loader(comfy, loaded, "out_of_memory_interrupted.safetensors")
    assert not [line for line in log_lines if "lora key not loaded" in line]
    tensors, _ = read_lora(comfy, "out_of_memory_interrupted.safetensors")
    assert any(tensor.abs().max() > 0 for key, tensor in tensors.items() if "lora_up" in key)   # 2 steps trained
    assert not (loras(comfy) / "out_of_memory.safetensors").exists()
    assert_models_restored(comfy, loaded, probe, before)


def half_written_then_disk_full(original, fail_on_call: int, folder: Path):
    """safetensors' save_file that, on its n-th call for a file in `folder`, writes half and fails."""
    calls = [0]

    def save_file(tensors, filename, metadata=None):
        if Path(filename).parent.resolve() != folder.resolve() and folder.resolve() not in Path(filename).resolve().parents:
            return original(tensors, filename, metadata=metadata)
        calls[0] += 1
        if calls[0] < fail_on_call:
            return original(tensors, filename, metadata=metadata)
        original(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    return save_file


@pytest.mark.parametrize("failing_save", ["intermediate", "final"])
def test_full_disk_while_saving_gives_a_clear_error_and_no_truncated_file(comfy, loaded, dataset, probe, before,  # noqa: F811
                                                                          monkeypatch, failing_save):
    import safetensors.torch

    name = f"disk_full_{failing_save}"
    # Intermediate saves at steps 1 and 2, the final one after step 3: fail the 2nd or the 3rd write.
    fail_on_call = {"intermediate": 2, "final": 3}[failing_save]
    monkeypatch.setattr(safetensors.torch, "save_file",
                        half_written_then_disk_full(safetensors.torch.save_file, fail_on_call, loras(comfy)))
    with pytest.raises(Exception) as caught:
        train(comfy, loaded, dataset, rates(comfy, **UNET_ONLY), schedule(comfy), steps=3, save_every_n_steps=1,
              lora_name=name)
    monkeypatch.undo()
    message = str(caught.value)
    assert "could not write" in message and "disk is full" in message and "No space left" in message, message
    written = sorted(path.name for path in loras(comfy).glob(f"{name}*"))
    assert written == ([f"{name}_step00001.safetensors"] if failing_save == "intermediate" else
                       [f"{name}_step00001.safetensors", f"{name}_step00002.safetensors"])
    for path in loras(comfy).glob(f"{name}*"):
        read_lora(comfy, path.name)          # every file that exists is complete
    assert leftovers(comfy) == []
    if failing_save == "intermediate":       # training stopped at the failed save: step 2 was the last one run
        assert len((comfy.output_dir / "lora_lab" / name / "log.jsonl").read_text().splitlines()) == 2
    assert_models_restored(comfy, loaded, probe, before)


def test_unwritable_folder_is_refused_before_training(comfy, loaded, dataset):  # noqa: F811
    (loras(comfy) / "blocked").write_bytes(b"a file where the folder should be")
    with pytest.raises(Exception, match=r"could not write .*blocked.*a file, not a folder"):
        train(comfy, loaded, dataset, rates(comfy, **UNET_ONLY), schedule(comfy), steps=2, lora_name="blocked/x")
    assert not (comfy.output_dir / "lora_lab" / "blocked").exists()    # nothing ran: no run folder
    assert (loras(comfy) / "blocked").read_bytes() == b"a file where the folder should be"


def test_a_file_that_appears_under_the_name_during_the_run_is_never_overwritten(comfy, loaded, dataset):  # noqa: F811
    """Someone (another run, a copy) creates race.safetensors while step 1 trains: ours becomes race_2."""
    pack = comfy.pack
    bridge, run = pack.nodes.comfy, pack.training.run
    model, clip, vae = loaded
    intruder = loras(comfy) / "race.safetensors"

    def on_step(record, total):
        if record.step == 1:
            intruder.write_bytes(b"someone else's file")

    settings = run.train_settings.TrainSettings(steps=3, batch_size=2, rank=4, alpha=4.0, precision="fp32",
                                                gradient_checkpointing=False, lora_name="race")
    with torch.inference_mode():
        access = bridge.model_access(model, clip, vae, bridge.check_compatible(model, clip, vae))
        result = run.trainer.train_lora(settings, access, dataset, rates(comfy, **UNET_ONLY), schedule(comfy),
                                        bridge.loras_dir(), bridge.output_dir(),
                                        run.host.TrainCallbacks(on_step=on_step))
    assert result.path.name == "race_2.safetensors"
    assert intruder.read_bytes() == b"someone else's file"
    read_lora(comfy, "race_2.safetensors")


def tree_digest(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder`: (size, mtime, sha256) / "dir"."""
    entries: dict[str, tuple] = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        entries[path.relative_to(folder).as_posix()] = (
            ("dir", stat.st_mtime_ns) if path.is_dir() else
            (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()))
    return entries


def test_the_dataset_folder_is_only_read(comfy, loaded, tmp_path):  # noqa: F811
    from PIL import Image

    folder = tmp_path / "3_subject"
    folder.mkdir()
    for index, image in enumerate(pattern_images()):
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(CAPTIONS[index])
    module = comfy.pack.training.data.dataset
    before = tree_digest(tmp_path)
    cache = comfy.output_dir / "lora_lab" / ".latent_cache"
    cached_before = set(cache.glob("*.pt"))
    folder_dataset = module.build_folder_dataset(tmp_path, module.DatasetOptions(resolution=64, bucketing=False,
                                                                                 flip=True))
    try:
        train(comfy, loaded, folder_dataset, rates(comfy, **UNET_ONLY), schedule(comfy), steps=2,
              save_every_n_steps=1, cache_latents_to_disk=True, lora_name="read_only_data")
    finally:   # the latent cache is shared by the session's runs: leave it as other tests expect it
        for path in set(cache.glob("*.pt")) - cached_before:
            path.unlink()
    assert tree_digest(tmp_path) == before
