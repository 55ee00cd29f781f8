"""The ShapesWorld attribute probe: a small CNN that reads a rendered scene back into words.

The evaluator (`evaluate.py`) scores an edit by reading the edited image with this probe and comparing the reading
with the example's known target scene. The probe reads, per image, the background class and, for each position slot,
whether it is empty or which ``(shape, colour)`` it holds. It is trained on scenes drawn at random over the whole
vocabulary (held-out combinations included: it is the measuring instrument, not the model) and rendered by
`render_scene`; half of every batch is degraded (resampling blur, a shift of a pixel or two, colour and brightness
jitter, noise) so that it also reads the slightly blurry, slightly off-colour images a trained decoder produces.

    probe = train_probe(num_steps=400)          # about a minute or two on 2 CPU cores
    probe_accuracy(probe).exact                 # share of fresh clean renders read exactly (>= 0.98 expected)
    probe.read_scene([image])                   # [Scene(...)] (None where no object is seen)
    probe.save_pretrained("probe")              # config.json + diffusion_pytorch_model.safetensors
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from ..processing_imagebind import ImageBindProcessor
from .instructions import _random_scene
from .world import BACKGROUNDS, COLOURS, SHAPES, SLOTS, Scene, SceneObject, render_scene


# Down-and-up resampling factors of `degrade` (1.0: no blur).
_BLUR_FACTORS = (0.5, 0.625, 0.75, 1.0)
ProbeImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str]
# Only its input conversion (`load_image`) is used: every image type the pipeline accepts, with its error messages.
_IMAGE_LOADER = ImageBindProcessor()


@dataclass(frozen=True)
class SceneReading:
    """What the probe sees in one image: a background and, per slot, nothing or a ``(shape, colour)``.

    Unlike a [`Scene`], a reading may hold no object at all (a decoder can paint an empty background).

    Args:
        background (`str`): one of `BACKGROUNDS`.
        objects (`tuple`): one entry per slot of `SLOTS` (left to right): ``None`` or ``(shape, colour)``.
    """

    background: str
    objects: tuple[Optional[tuple[str, str]], ...]

    @classmethod
    def from_scene(cls, scene: Scene) -> "SceneReading":
        """The exact reading of ``scene``."""
        if not isinstance(scene, Scene):
            raise TypeError(f"`scene` must be a Scene, got {type(scene).__name__}.")
        slots = []
        for slot in SLOTS:
            obj = scene.object_at(slot)
            slots.append(None if obj is None else (obj.shape, obj.colour))
        return cls(scene.background, tuple(slots))

    def to_scene(self) -> Optional[Scene]:
        """The reading as a [`Scene`], or ``None`` when no object was seen (not a valid scene)."""
        objects = [SceneObject(item[0], item[1], slot) for slot, item in zip(SLOTS, self.objects) if item is not None]
        return Scene(self.background, tuple(objects)) if objects else None


@dataclass
class ShapesProbeOutput(BaseOutput):
    """Logits of [`ShapesProbe`].

    Args:
        background_logits (`torch.Tensor` of shape `(batch, num_backgrounds)`).
        shape_logits (`torch.Tensor` of shape `(batch, num_slots, 1 + num_shapes)`): class 0 is "empty slot", class
            ``1 + i`` is ``shapes[i]``.
        colour_logits (`torch.Tensor` of shape `(batch, num_slots, num_colours)`): meaningless for empty slots.
    """

    background_logits: torch.Tensor
    shape_logits: torch.Tensor
    colour_logits: torch.Tensor


@dataclass
class ProbeAccuracy(BaseOutput):
    """Accuracy of the probe on freshly rendered, clean scenes.

    Args:
        exact (`float`): share of scenes read exactly (background and every slot).
        background (`float`): share of backgrounds read correctly.
        slots (`float`): share of slots read correctly (empty, or the right shape and colour).
        num_scenes (`int`): scenes rendered.
    """

    exact: float
    background: float
    slots: float
    num_scenes: int


class ShapesProbe(ModelMixin, ConfigMixin):
    r"""
    A small CNN reading a ShapesWorld scene image: the background class, and per position slot an "empty or shape"
    class and a colour class (factorised, so a ``(shape, colour)`` pair never seen together is still read).

    Any image size is accepted: `preprocess` resizes to ``image_size`` (bilinear, antialiased), so the probe reads the
    32×32 outputs of the tiny test pipeline as well as 64×64 renders.

    Args:
        image_size (`int`, defaults to 64): side of the (square) images the network sees.
        channels (`tuple[int, ...]`, defaults to `(16, 32, 64)`): widths of the three stride-2 convolution stages
            (a last stride-1 stage keeps the final width).
        hidden_dim (`int`, defaults to 256): width of the hidden layer of the classification head.
        shapes, colours, backgrounds, slots (`tuple[str, ...]`): the vocabulary the heads classify (defaults: the
            ShapesWorld vocabulary); stored in the config so a saved probe knows what it reads.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 64,
        channels: Sequence[int] = (16, 32, 64),
        hidden_dim: int = 256,
        shapes: Sequence[str] = SHAPES,
        colours: Sequence[str] = COLOURS,
        backgrounds: Sequence[str] = BACKGROUNDS,
        slots: Sequence[str] = SLOTS,
    ):
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"`image_size` must be an int >= 16, got {image_size!r}.")
        if len(channels) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"`channels` must be 3 positive ints, got {channels!r}.")
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"`hidden_dim` must be a positive int, got {hidden_dim!r}.")
        vocabularies = {"shapes": shapes, "colours": colours, "backgrounds": backgrounds, "slots": slots}
        for name, vocabulary in vocabularies.items():
            if len(vocabulary) == 0 or len(set(vocabulary)) != len(vocabulary):
                raise ValueError(f"`{name}` must be a non-empty list of distinct names, got {vocabulary!r}.")
        self.shapes, self.colours = tuple(shapes), tuple(colours)
        self.backgrounds, self.slots = tuple(backgrounds), tuple(slots)

        layers: list[nn.Module] = []
        in_channels = 3
        # A 4x4 stride-2 stem, two 3x3 stride-2 stages, one 3x3 stride-1 stage: 8x downsampling in total.
        stages = [(channels[0], 4, 2), (channels[1], 3, 2), (channels[2], 3, 2), (channels[2], 3, 1)]
        for out_channels, kernel, stride in stages:
            layers += [nn.Conv2d(in_channels, out_channels, kernel, stride, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(out_channels), nn.ReLU()]
            in_channels = out_channels
        # A (4 x 2·slots) grid keeps where things are: two cells across each slot.
        self.pool_size = (4, 2 * len(self.slots))
        layers.append(nn.AdaptiveAvgPool2d(self.pool_size))
        self.features = nn.Sequential(*layers)
        num_slots = len(self.slots)
        self.num_outputs = (
            len(self.backgrounds) + num_slots * (1 + len(self.shapes)) + num_slots * len(self.colours)
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * self.pool_size[0] * self.pool_size[1], hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, self.num_outputs),
        )

    # ------------------------------------------------------------------------------------------------ network
    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True) -> Union[ShapesProbeOutput, tuple]:
        """
        Classify preprocessed images.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, 3, image_size, image_size)`): RGB values in [0, 1] (see
                `preprocess`).
            return_dict (`bool`, defaults to `True`): return a [`ShapesProbeOutput`] instead of a tuple.

        Returns:
            [`ShapesProbeOutput`] or `tuple` ``(background_logits, shape_logits, colour_logits)``.
        """
        size = self.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise TypeError(f"`pixel_values` must be a float tensor of shape (batch, 3, {size}, {size}).")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size) or pixel_values.shape[0] == 0:
            raise ValueError(
                f"`pixel_values` must have shape (batch, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "use `ShapesProbe.preprocess` to bring images of any size to it."
            )
        x = pixel_values.to(device=self.device, dtype=self.dtype) * 2.0 - 1.0
        logits = self.head(self.features(x))
        num_slots, num_backgrounds = len(self.slots), len(self.backgrounds)
        background, rest = logits[:, :num_backgrounds], logits[:, num_backgrounds:]
        shape_size = num_slots * (1 + len(self.shapes))
        shape = rest[:, :shape_size].reshape(-1, num_slots, 1 + len(self.shapes))
        colour = rest[:, shape_size:].reshape(-1, num_slots, len(self.colours))
        if not return_dict:
            return background, shape, colour
        return ShapesProbeOutput(background_logits=background, shape_logits=shape, colour_logits=colour)

    # ------------------------------------------------------------------------------------------------ reading
    def preprocess(self, images: Union[ProbeImageInput, Sequence[ProbeImageInput]]) -> torch.Tensor:
        """
        Bring images of any size and type to the network's input.

        Args:
            images: one image or a list: PIL images, paths, numpy arrays ``(H, W, 3)`` or tensors ``(3, H, W)``
                (uint8, or float in [0, 1]); a 4-D array / tensor is a batch.

        Returns:
            `torch.Tensor` of shape `(batch, 3, image_size, image_size)`, values in [0, 1], on the CPU.
        """
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("`images` is an empty list.")
        size = self.config.image_size
        tensors = []
        for image in images:
            pil = _IMAGE_LOADER.load_image(image)
            pixels = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
            tensors.append(_resize(pixels[None], size)[0])
        return torch.stack(tensors)

    def decode(self, output: ShapesProbeOutput) -> list[SceneReading]:
        """Turn logits into readings (most likely class of every head)."""
        backgrounds = output.background_logits.argmax(-1).tolist()
        shapes = output.shape_logits.argmax(-1).tolist()
        colours = output.colour_logits.argmax(-1).tolist()
        readings = []
        for background, slot_shapes, slot_colours in zip(backgrounds, shapes, colours):
            objects = tuple(
                None if shape == 0 else (self.shapes[shape - 1], self.colours[colour])
                for shape, colour in zip(slot_shapes, slot_colours)
            )
            readings.append(SceneReading(self.backgrounds[background], objects))
        return readings

    @torch.no_grad()
    def read(
        self, images: Union[ProbeImageInput, Sequence[ProbeImageInput]], batch_size: int = 256
    ) -> list[SceneReading]:
        """
        Read images.

        Args:
            images: see `preprocess`.
            batch_size (`int`, defaults to 256): images per forward pass.

        Returns:
            `list[SceneReading]`, one per image.
        """
        pixels = self.preprocess(images)
        readings = []
        for start in range(0, len(pixels), batch_size):
            readings += self.decode(self(pixels[start : start + batch_size]))
        return readings

    @torch.no_grad()
    def read_scene(self, images: Union[ProbeImageInput, Sequence[ProbeImageInput]]) -> list[Optional[Scene]]:
        """
        Read images as scenes.

        Args:
            images: see `preprocess`.

        Returns:
            `list[Scene | None]`: one per image; ``None`` where the probe sees no object (no valid scene).
        """
        return [reading.to_scene() for reading in self.read(images)]

    def check_vocabulary(self) -> None:
        """Raise `ValueError` when the probe was trained on another vocabulary than the current ShapesWorld."""
        for name, mine, world in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, COLOURS),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
            ("slots", self.slots, SLOTS),
        ):
            if tuple(mine) != tuple(world):
                raise ValueError(
                    f"The probe reads {name} {list(mine)} but ShapesWorld has {list(world)}; retrain it (--train)."
                )


# --------------------------------------------------------------------------------------------------------------------
# Data and augmentation
# --------------------------------------------------------------------------------------------------------------------
def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def render_batch(
    scenes: Sequence[Scene], image_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Render scenes and their probe targets.

    Args:
        scenes (`Sequence[Scene]`): the scenes.
        image_size (`int`, defaults to 64): render size.

    Returns:
        ``(pixels, background, shape, colour)``: pixels `(N, 3, S, S)` in [0, 1]; background `(N,)` class indices;
        shape `(N, num_slots)` with 0 for an empty slot and ``1 + index`` otherwise; colour `(N, num_slots)` with -100
        (ignored by the loss) for empty slots.
    """
    pixels = torch.from_numpy(np.stack([np.asarray(render_scene(scene, image_size)) for scene in scenes]))
    pixels = pixels.permute(0, 3, 1, 2).float().div(255.0)
    background = torch.tensor([BACKGROUNDS.index(scene.background) for scene in scenes])
    shape = torch.zeros(len(scenes), len(SLOTS), dtype=torch.long)
    colour = torch.full((len(scenes), len(SLOTS)), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            shape[i, SLOTS.index(obj.slot)] = SHAPES.index(obj.shape) + 1
            colour[i, SLOTS.index(obj.slot)] = COLOURS.index(obj.colour)
    return pixels, background, shape, colour


def degrade(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """
    Degrade clean renders the way decoder outputs differ from them (a new tensor; the input is not modified).

    Per image: resampling blur (down to 1/2, 5/8, 3/4 of the size and back up, or none), a shift of up to 2 pixels
    (edges replicated), per-channel gain (±8 %) and offset (±0.04), Gaussian noise (std up to 0.04).

    Args:
        pixels (`torch.Tensor` of shape `(N, 3, S, S)`): values in [0, 1].
        generator (`torch.Generator`): the only source of randomness (CPU).

    Returns:
        `torch.Tensor` like ``pixels``.
    """
    n, _, size, _ = pixels.shape

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    # Batched by blur level (a handful of interpolation calls instead of one per image).
    out = pixels.clone()
    levels = torch.randint(0, len(_BLUR_FACTORS), (n,), generator=generator)
    for level, factor in enumerate(_BLUR_FACTORS):
        index = (levels == level).nonzero().flatten()
        if factor < 1.0 and len(index):
            out[index] = _resize(_resize(out[index], max(8, int(round(size * factor)))), size)
    # Whole-pixel shifts as one batched resampling: with align_corners=False a translation of 2·d/S in normalised
    # coordinates moves the image by exactly d pixels, so bilinear sampling just copies pixels.
    shifts = torch.randint(-2, 3, (n, 2), generator=generator).float() * 2.0 / size
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shifts
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = uniform(0.92, 1.08, n, 3, 1, 1)
    offset = uniform(-0.04, 0.04, n, 3, 1, 1)
    noise = torch.randn(out.shape, generator=generator) * uniform(0.0, 0.04, n, 1, 1, 1)
    return (out * gain + offset + noise).clamp(0.0, 1.0)


def random_scenes(rng: np.random.Generator, count: int) -> list[Scene]:
    """``count`` scenes drawn uniformly over object counts (1–3), slots, shapes, colours and backgrounds."""
    return [_random_scene(rng) for _ in range(count)]


# --------------------------------------------------------------------------------------------------------------------
# Training and measurement
# --------------------------------------------------------------------------------------------------------------------
def probe_loss(output: ShapesProbeOutput, background: torch.Tensor, shape: torch.Tensor, colour: torch.Tensor):
    """Sum of the cross-entropies of the three heads (colour only where a slot holds an object)."""
    device = output.background_logits.device
    loss = F.cross_entropy(output.background_logits, background.to(device))
    loss = loss + F.cross_entropy(output.shape_logits.flatten(0, 1), shape.to(device).flatten())
    return loss + F.cross_entropy(output.colour_logits.flatten(0, 1), colour.to(device).flatten(), ignore_index=-100)


def train_probe(
    num_steps: int = 400,
    batch_size: int = 64,
    image_size: int = 64,
    learning_rate: float = 3e-3,
    augment: bool = True,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> ShapesProbe:
    """
    Train a [`ShapesProbe`] on freshly rendered random scenes (never the same batch twice).

    Deterministic for a given ``seed`` and device; the caller's global torch RNG state is left untouched.

    Args:
        num_steps (`int`, defaults to 400): optimizer steps (one-cycle learning-rate schedule).
        batch_size (`int`, defaults to 64): scenes per step.
        image_size (`int`, defaults to 64): render and input size.
        learning_rate (`float`, defaults to 3e-3): peak AdamW learning rate.
        augment (`bool`, defaults to `True`): degrade half of every batch with `degrade`.
        seed (`int`, defaults to 0): seeds the weights, the scenes and the augmentation.
        device (`str` or `torch.device`, *optional*): where to train (CPU by default).
        progress (`bool`, defaults to `True`): show a progress bar.

    Returns:
        [`ShapesProbe`] in eval mode.
    """
    for name, value, minimum in (("num_steps", num_steps, 1), ("batch_size", batch_size, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be a positive number, got {learning_rate!r}.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    rng = np.random.default_rng([seed, 1])
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = ShapesProbe(image_size=image_size)
    probe.to(device).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=num_steps)
    for _ in tqdm(range(num_steps), desc="Training the ShapesWorld probe", disable=not progress):
        pixels, background, shape, colour = render_batch(random_scenes(rng, batch_size), image_size)
        if augment:
            half = batch_size // 2
            pixels = torch.cat([pixels[:half], degrade(pixels[half:], generator)])
        loss = probe_loss(probe(pixels.to(device)), background, shape, colour)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"The probe's training loss is not finite ({loss.item()}); lower `learning_rate`.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return probe.eval()


@torch.no_grad()
def probe_accuracy(
    probe: ShapesProbe, num_scenes: int = 1000, seed: int = 1234, batch_size: int = 250
) -> ProbeAccuracy:
    """
    Measure the probe on freshly rendered clean scenes (random over the whole vocabulary, at the probe's size).

    Args:
        probe ([`ShapesProbe`]): the probe.
        num_scenes (`int`, defaults to 1000): scenes to render.
        seed (`int`, defaults to 1234): seeds the scenes (a stream the training never draws from).
        batch_size (`int`, defaults to 250): scenes per forward pass.

    Returns:
        [`ProbeAccuracy`].
    """
    if not isinstance(probe, ShapesProbe):
        raise TypeError(f"`probe` must be a ShapesProbe, got {type(probe).__name__}.")
    if isinstance(num_scenes, bool) or not isinstance(num_scenes, int) or num_scenes < 1:
        raise ValueError(f"`num_scenes` must be a positive int, got {num_scenes!r}.")
    scenes = random_scenes(np.random.default_rng([seed, 2]), num_scenes)
    was_training = probe.training
    probe.eval()
    exact = background = slots = 0
    try:
        for start in range(0, num_scenes, batch_size):
            chunk = scenes[start : start + batch_size]
            pixels = render_batch(chunk, probe.config.image_size)[0]
            for reading, scene in zip(probe.decode(probe(pixels)), chunk):
                truth = SceneReading.from_scene(scene)
                exact += reading == truth
                background += reading.background == truth.background
                slots += sum(a == b for a, b in zip(reading.objects, truth.objects))
    finally:
        probe.train(was_training)
    return ProbeAccuracy(
        exact=exact / num_scenes,
        background=background / num_scenes,
        slots=slots / (num_scenes * len(SLOTS)),
        num_scenes=num_scenes,
    )


__all__ = [
    "ProbeAccuracy",
    "SceneReading",
    "ShapesProbe",
    "ShapesProbeOutput",
    "degrade",
    "probe_accuracy",
    "probe_loss",
    "random_scenes",
    "render_batch",
    "train_probe",
]
