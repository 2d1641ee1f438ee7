"""Batches for the step loop (ComfyUI-agnostic): which samples go together (one bucket per batch,
epoch after epoch, resumable) and how they become (latents, conditioning), caching what does not
change."""
from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..run.distributed import current as current_shard
from .image_tensors import frames_to_image, pil_to_image

if TYPE_CHECKING:   # the run's contract with the host; the data stage only reads its encoders
    from ..run.host import ModelAccess

# A sample's control latent in its conditioning, under the name ComfyUI's extra_conds reads (an edit dataset)
REFERENCE_LATENTS = "reference_latents"
# An image-to-video model's start image: the latent of the clip's first frame followed by grey frames, and
# the mask of the latent frames that image gives (0) and those to generate (1), under the names ComfyUI's
# extra_conds reads (what WanImageToVideo puts on the conditioning)
START_LATENT, START_MASK = "concat_latent_image", "concat_mask"
GREY = 0.5   # WanImageToVideo's fill for the frames after the start image


def random_state_to_json(rng: random.Random) -> list:
    """``random.Random.getstate()`` as JSON-ready lists (a resumable feeder's state)."""
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def random_state_from_json(state: list) -> tuple:
    version, internal, gauss_next = state
    return version, tuple(internal), gauss_next


def batch_key(sample) -> tuple[int, ...]:
    """What a batch's samples share: the bucket (width, height), and the frame count of a clip (a dataset
    sample without one, an image, keeps the bucket alone)."""
    return tuple(getattr(sample, "batch_key", sample.bucket))


def largest_bucket_size(dataset) -> int:
    """Images per epoch (repeats counted) in the fullest bucket: the largest possible batch."""
    return max((sum(dataset.samples[index].repeats for index in indices)
                for indices in dataset.buckets().values()), default=0)


def batches_per_epoch_of(dataset, batch_size: int) -> int:
    """Batches in one epoch: per bucket, its images (repeats counted) in whole batches (a bucket's
    leftover images wait for the next epoch's draw, as BucketBatches deals them)."""
    return sum(sum(dataset.samples[index].repeats for index in indices) // batch_size
               for indices in dataset.buckets().values())


class BucketBatches:
    """Endless batches of sample indices, each from one bucket, epoch after epoch; an iterator whose
    position can be saved and restored exactly (resume).

    Each epoch is ``dataset.epoch_indices(rng)`` (shuffled, repeats expanded); a batch is emitted when
    a bucket has `batch_size` pending samples. A bucket's leftover at the end of an epoch is dropped
    (it comes again, reshuffled, in the next epoch).
    """

    def __init__(self, dataset, batch_size: int, rng: random.Random) -> None:
        if batch_size > largest_bucket_size(dataset):
            raise ValueError(f"batch_size {batch_size} exceeds the largest bucket")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rng = rng
        self.epoch: list[int] = []                          # this epoch's shuffled sample indices
        self.position = 0                                   # next index of `epoch` to place
        self.pending: dict[tuple[int, ...], list[int]] = {}  # batch key -> indices waiting for a full batch

    def __iter__(self) -> "BucketBatches":
        return self

    def __next__(self) -> list[int]:
        while True:
            if self.position >= len(self.epoch):
                self.epoch, self.position, self.pending = self.dataset.epoch_indices(self.rng), 0, {}
            index = self.epoch[self.position]
            self.position += 1
            bucket = self.pending.setdefault(batch_key(self.dataset.samples[index]), [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batch = list(bucket)
                bucket.clear()
                return batch

    def state(self) -> dict[str, Any]:
        """JSON-ready position: the epoch's order, where it stands, pending buckets and the rng."""
        return {"epoch": list(self.epoch), "position": self.position,
                "pending": [[list(bucket), list(indices)] for bucket, indices in self.pending.items()],
                "rng": random_state_to_json(self.rng)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = list(state["epoch"]), int(state["position"])
        self.pending = {tuple(bucket): list(indices) for bucket, indices in state["pending"]}
        self.rng.setstate(random_state_from_json(state["rng"]))


def bucket_batches(dataset, batch_size: int, rng: random.Random) -> BucketBatches:
    """Endless one-bucket batches (see :class:`BucketBatches`)."""
    return BucketBatches(dataset, batch_size, rng)


def conditioning_crop(offset, flipped: bool, resized_size, bucket) -> tuple[int, int]:
    """SDXL's crop (left, top) for an image as the model sees it: in a flipped image the crop's left
    edge is the mirror of its right edge in the unflipped one (as sd-scripts conditions it)."""
    left, top = offset
    if flipped:
        left = resized_size[0] - (left + bucket[0])
    return (int(left), int(top))


def concat_conditioning(conds: list[dict]) -> dict:
    """Batch per-caption conditioning. Captions longer than 75 tokens give longer sequences: shorter
    ones are repeated to the least common multiple length, as ComfyUI batches CLIP conds. Where a
    model's text sequence cannot be repeated (an LLM encoder with positions: "exact_length"), captions
    of different lengths stay separate ({"samples": [...]}: the model runs them one by one, as
    ComfyUI does with conds it cannot concatenate)."""
    if len(conds) == 1:
        return conds[0]
    lengths = [cond["c_crossattn"].shape[1] for cond in conds]
    if conds[0].get("exact_length") and len(set(lengths)) > 1:
        return {"samples": conds}
    target = math.lcm(*lengths)
    crossattn = torch.cat([cond["c_crossattn"].repeat(1, target // cond["c_crossattn"].shape[1], 1)
                           for cond in conds])
    merged = {"c_crossattn": crossattn}
    for key, value in conds[0].items():
        if key == "c_crossattn" or value is None:
            continue
        merged[key] = torch.cat([cond[key] for cond in conds]) if torch.is_tensor(value) else value
    return merged


def _dataset_key(dataset) -> str:
    return getattr(dataset, "fingerprint", "") or "no-fingerprint"


class BatchFeeder:
    """Turns sample indices into (x0 latents, conditioning), caching what does not change."""

    def __init__(self, dataset, access: ModelAccess, train_text: bool, settings, cache_dir: Path):
        self.dataset = dataset
        self.access = access
        self.train_text = train_text
        self.order_rng = random.Random(settings.training_seed)
        self.augment_rng = random.Random(settings.training_seed + 1)
        self.batches = bucket_batches(dataset, settings.batch_size, self.order_rng)
        self.latent_cache: dict[tuple, torch.Tensor] = {}   # in memory only when not cached on disk
        self.text_cache: dict[Any, dict] = {}   # caption, or (caption, sample, crop, flip) with a control image
        # Shared by runs (a re-run gets a new run folder); keyed by dataset content + settings, the VAE
        # weights and the latent format, so a changed image, bucket or VAE never hits a stale entry.
        # With a disk cache, latents are read back from disk each time (the OS page cache keeps hot
        # files fast), so host memory stays bounded however large the dataset is.
        self.disk_dir = cache_dir if settings.cache_latents_to_disk and access.latent_key else None
        self.cache_latents = dataset.caching_possible
        # Shuffled or dropped-out captions make a new string nearly every step: caching those would grow
        # without bound, so only static captions are cached.
        # An edit model's dataset: each sample's control image goes to the model as a reference latent,
        # and to the text encoder where the family's encoder sees images (Qwen-Image-Edit)
        self.controls = bool(getattr(dataset, "has_controls", False))
        self.text_sees_control = self.controls and access.entry.control_text_pixels > 0
        # An image-to-video model: each clip's first frame is its start image
        self.start_frame = access.entry.start_frame
        # A text encoding that sees the control image is one per crop: with random crops, not cacheable either
        self.cache_text = (not train_text and dataset.static_captions
                           and (self.cache_latents or not self.text_sees_control))

    def _disk_path(self, key: tuple) -> Path | None:
        """Where the disk cache keeps this latent (None without a disk cache)."""
        if not (self.cache_latents and self.disk_dir is not None):
            return None
        name = hashlib.sha256(repr((_dataset_key(self.dataset), self.access.latent_key, key)).encode()).hexdigest()[:32]
        return self.disk_dir / f"{name}.pt"

    def latent(self, index: int, offset, flipped) -> torch.Tensor:
        """The latent of sample `index` with this crop and flip (from a cache when possible), on the CPU: a
        clip's frames encode together (a video VAE's latent with a frame axis)."""
        if getattr(self.dataset.samples[index], "frames", ()):
            return self._latent((index, tuple(offset), bool(flipped)),
                                lambda: frames_to_image(self.dataset.render_frames(index, tuple(offset), bool(flipped))))
        return self._latent((index, tuple(offset), bool(flipped)),
                            lambda: pil_to_image(self.dataset.render(index, tuple(offset), bool(flipped))))

    def control_latent(self, index: int, offset, flipped) -> torch.Tensor:
        """The latent of sample `index`'s control image, cropped and flipped as the image (cached the same way)."""
        return self._latent(("control", index, tuple(offset), bool(flipped)),
                            lambda: pil_to_image(self.dataset.render_control(index, tuple(offset), bool(flipped))))

    def start_latent(self, index: int, offset, flipped) -> torch.Tensor:
        """An image-to-video clip's start image as the model takes it: the latent of its first frame (cropped
        and flipped as the clip) followed by grey frames, as many as the clip has (cached like the clip's)."""
        def render() -> torch.Tensor:
            first = pil_to_image(self.dataset.render(index, tuple(offset), bool(flipped)))
            pixels = torch.full((self.dataset.samples[index].frame_count, *first.shape[1:]), GREY)
            pixels[:1] = first
            return pixels

        return self._latent(("start", index, tuple(offset), bool(flipped)), render)

    def _latent(self, key: tuple, render: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The latent of the IMAGE batch `render` draws (an image, or a clip's frames), cached under `key`."""
        if self.cache_latents and key in self.latent_cache:
            return self.latent_cache[key]
        disk_path = self._disk_path(key)
        if disk_path is not None and disk_path.is_file():
            return torch.load(disk_path, map_location="cpu", weights_only=True)
        pixels = render()
        with torch.no_grad():
            latent = self.access.encode_pixels(pixels).detach().clone().to("cpu", torch.float32)
        if disk_path is not None:
            disk_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(latent, disk_path)
        elif self.cache_latents:
            self.latent_cache[key] = latent
        return latent

    def prepare(self, check_cancel: Callable[[], None] | None = None) -> tuple[bool, bool]:
        """Encode, once and up front, every latent and caption that will not change during training,
        so the VAE and frozen text encoders can leave the GPU before the first step.

        Returns (all latents cached, all captions cached). Cancel is checked between images.
        """
        flips = (False, True) if self.dataset.options.flip else (False,)
        if self.cache_latents:
            for index in range(len(self.dataset.samples)):
                if check_cancel is not None:
                    check_cancel()
                offset, _ = self.dataset.augmentation(index, None)   # the centre crop: no rng draw
                for flipped in flips:
                    encoders = [((), self.latent)]
                    if self.controls:
                        encoders.append((("control",), self.control_latent))
                    if self.start_frame:
                        encoders.append((("start",), self.start_latent))
                    for prefix, encode in encoders:
                        key = (*prefix, index, tuple(offset), flipped)
                        disk_path = self._disk_path(key)
                        if key in self.latent_cache or (disk_path is not None and disk_path.is_file()):
                            continue  # already cached: no need to read it now
                        encode(index, offset, flipped)
        if self.cache_text:
            fixed = random.Random(0)  # static captions never draw from it
            if self.text_sees_control:   # one encoding per caption and control image (each crop and flip)
                for index in range(len(self.dataset.samples)):
                    offset, _ = self.dataset.augmentation(index, None)
                    for flipped in flips:
                        self.text_with_control(index, offset, flipped, self.dataset.caption_for_step(index, fixed))
            else:
                self._cache_captions([self.dataset.caption_for_step(index, fixed)
                                      for index in range(len(self.dataset.samples))])
        return self.cache_latents, self.cache_text

    def cached_bytes(self) -> dict[str, int]:
        """Memory held by the in-memory caches (latents on the host, text encodings on the device)."""
        def size(tensors) -> int:
            return sum(tensor.numel() * tensor.element_size() for tensor in tensors if torch.is_tensor(tensor))
        return {"latents": size(self.latent_cache.values()),
                "text": size(value for cond in self.text_cache.values() for value in cond.values())}

    def state(self) -> dict[str, Any]:
        """Data order and augmentation rng (JSON): with the generators, all randomness of a run."""
        return {"batches": self.batches.state(), "augment_rng": random_state_to_json(self.augment_rng)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.batches.load_state(state["batches"])
        self.augment_rng.setstate(random_state_from_json(state["augment_rng"]))

    def _text(self, captions: list[str]) -> dict:
        if not self.cache_text:
            if self.train_text:
                return self.access.encode_captions(captions)
            with torch.no_grad():
                return self.access.encode_captions(captions)
        self._cache_captions(captions)
        return concat_conditioning([self.text_cache[caption] for caption in captions])

    def _cache_captions(self, captions: list[str]) -> None:
        """Encode (once each) the captions not cached yet."""
        for caption in dict.fromkeys(captions):
            if caption in self.text_cache:
                continue
            with torch.no_grad():
                encoded = self.access.encode_captions([caption])
            self.text_cache[caption] = {key: value.detach().clone() if torch.is_tensor(value) else value
                                        for key, value in encoded.items()}

    def text_with_control(self, index: int, offset, flipped: bool, caption: str) -> dict:
        """A caption encoded together with its sample's control image (the text encoder sees it), cached
        per caption and image when captions are static."""
        key = (caption, index, tuple(offset), bool(flipped))
        if key in self.text_cache:
            return self.text_cache[key]
        image = pil_to_image(self.dataset.render_control(index, tuple(offset), bool(flipped)))
        if self.train_text:
            return self.access.encode_captions([caption], images=[image])
        with torch.no_grad():
            encoded = self.access.encode_captions([caption], images=[image])
        if self.cache_text:
            self.text_cache[key] = {name: value.detach().clone() if torch.is_tensor(value) else value
                                    for name, value in encoded.items()}
        return encoded

    def sample_conditioning(self, index: int, offset, flipped: bool, caption: str) -> dict:
        """One sample's text conditioning, with its control image as reference latent (an edit dataset) and
        its start image with the mask of the frames it gives (an image-to-video model)."""
        if self.text_sees_control:
            cond = self.text_with_control(index, offset, flipped, caption)
        else:
            cond = self._text([caption])
        device = self.access.device
        extras = {}
        if self.controls:
            extras[REFERENCE_LATENTS] = self.control_latent(index, offset, flipped).to(device)
        if self.start_frame:
            start = self.start_latent(index, offset, flipped)
            mask = torch.ones((1, 1, *start.shape[2:]), dtype=start.dtype)
            mask[:, :, :1] = 0.0   # the first latent frame holds the start image (1 frame: (1 - 1) // 4 + 1)
            extras.update({START_LATENT: start.to(device), START_MASK: mask.to(device)})
        return {**cond, **extras}

    def __call__(self) -> tuple[torch.Tensor, dict]:
        indices = next(self.batches)
        # Data parallel (training/run/distributed.py): every rank draws the whole global batch's augmentation
        # and captions, so all ranks' random streams stay equal, and loads only its own slice.
        mine = range(len(indices))[current_shard().part(len(indices))]
        latents, captions, sizes, samples = [], [], [], []
        for position, index in enumerate(indices):
            sample = self.dataset.samples[index]
            # The augmentation (crop offset, flip) is drawn first, so a cached latent is found
            # without decoding the image.
            offset, flipped = self.dataset.augmentation(index, self.augment_rng)
            caption = self.dataset.caption_for_step(index, self.augment_rng)
            if position not in mine:
                continue
            latents.append(self.latent(index, offset, flipped))
            captions.append(caption)
            samples.append((index, offset, flipped))
            sizes.append({"original_size": tuple(sample.original_size),
                          "crop_offset": conditioning_crop(offset, flipped, sample.resized_size, sample.bucket),
                          "target_size": tuple(sample.bucket)})
        x0 = torch.cat(latents).to(self.access.device)
        if self.controls or self.start_frame:
            cond = concat_conditioning([self.sample_conditioning(index, offset, flipped, caption)
                                        for (index, offset, flipped), caption in zip(samples, captions)])
        else:
            cond = self._text(captions)
        return x0, self.access.extra_conditioning(cond, sizes)
