"""ImageBind input preprocessing (images, audio, text), numerically identical to Meta's reference.

Meta's reference (``imagebind.data`` in facebookresearch/ImageBind) is the behaviour we reproduce; this is an
independent implementation on PIL, torch, torchaudio and transformers (no torchvision / pytorchvideo), checked
against the reference by ``tests/test_processing_imagebind.py``:

* **images** – ``PIL.Image.convert("RGB")``, bicubic resize of the shorter side to 224 (PIL's filter, as
  torchvision's ``Resize`` does on PIL images), centre crop 224, ``/255``, CLIP mean/std.
* **audio** – resample to 16 kHz (``torchaudio.functional.resample``, default sinc filter), three 2 s clips evenly
  spaced as pytorchvideo's ``ConstantClipsPerVideoSampler`` places them, kaldi fbank (128 mel bins, 25 ms Hanning
  window, 10 ms shift, htk_compat, no dither), zero-pad/crop to 204 frames, ``(x + 4.268) / 9.138``.
* **text** – CLIP BPE: ``<|startoftext|>`` + BPE ids + ``<|endoftext|>``, zero padded to 77, truncated so that
  ``<|endoftext|>`` stays last.
"""

from __future__ import annotations

import gzip
import html
import numbers
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence, Union

import numpy as np
import PIL.Image
import soundfile
import torch
import torchaudio
from diffusers.utils import BaseOutput

CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[PIL.Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]
AudioInput = Union[str, os.PathLike, tuple]


@dataclass
class ImageBindProcessorOutput(BaseOutput):
    """
    Output of [`ImageBindProcessor.__call__`]; only the modalities that were given are present as keys.

    Args:
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, image_size, image_size)`, *optional*):
            Preprocessed images.
        audio_features (`torch.FloatTensor` of shape `(batch, clips, 1, num_mel_bins, target_length)`, *optional*):
            Normalised log-mel filterbanks, one per audio clip.
        input_ids (`torch.LongTensor` of shape `(batch, context_length)`, *optional*):
            CLIP BPE token ids.
    """

    pixel_values: torch.FloatTensor | None = None
    audio_features: torch.FloatTensor | None = None
    input_ids: torch.LongTensor | None = None


def clip_tokenizer_from_bpe(bpe_path: str | os.PathLike, num_merges: int = 49152 - 256 - 2, context_length: int = 77):
    """
    Build a transformers `CLIPTokenizer` from OpenAI's/Meta's `bpe_simple_vocab_16e6.txt.gz`.

    The vocabulary is laid out as in OpenAI's CLIP (the 256 byte symbols, the same with `</w>`, one entry per merge,
    then `<|startoftext|>` and `<|endoftext|>`), so the ids equal those of Meta's `SimpleTokenizer` (49 408 tokens,
    `<|startoftext|>` = 49406, `<|endoftext|>` = 49407). Everything is built in memory; nothing is written to disk.

    Args:
        bpe_path (`str` or `os.PathLike`):
            The merges file, gzip-compressed (as shipped with CLIP/ImageBind, e.g. `imagebind/bpe/
            bpe_simple_vocab_16e6.txt.gz`) or plain text. Its first line is a header and is skipped.
        num_merges (`int`, defaults to 48894):
            How many merges to use; CLIP's vocabulary of 49 152 - 256 - 2 merges (49 408 tokens) by default.
        context_length (`int`, defaults to 77):
            Stored as the tokenizer's `model_max_length`.

    Returns:
        `transformers.CLIPTokenizer`
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if not os.path.isfile(bpe_path):
        raise FileNotFoundError(f"`bpe_path`: BPE merges file not found: {os.fspath(bpe_path)!r}")
    with open(bpe_path, "rb") as fh:
        raw = fh.read()
    try:
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"`bpe_path`: could not read BPE merges file {os.fspath(bpe_path)!r}: {e}") from e
    lines = text.split("\n")[1 : num_merges + 1]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    if len(merges) < num_merges or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"`bpe_path`: {os.fspath(bpe_path)!r} is not a CLIP BPE merges file: expected {num_merges} lines of"
            " two symbols after the header."
        )
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def load_clip_tokenizer(path: str | os.PathLike):
    """A CLIP BPE tokenizer from a saved tokenizer folder or a ``bpe_simple_vocab_16e6.txt.gz``-style merges file."""
    if os.path.isdir(path):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(path)
    if not os.path.isfile(path):
        raise ValueError(f"ImageBind tokenizer {os.fspath(path)!r} is neither a tokenizer folder nor a merges file.")
    return clip_tokenizer_from_bpe(path)


class ImageBindProcessor:
    """
    Prepares images, audio and text for [`ImageBindModel`] exactly as Meta's ImageBind reference (`imagebind.data`)
    does. All defaults are Meta's.

    Args:
        tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*):
            A tokenizer with the CLIP BPE vocabulary (e.g. `transformers.CLIPTokenizer`, or
            [`clip_tokenizer_from_bpe`] on Meta's `bpe_simple_vocab_16e6.txt.gz`). Only needed for [`tokenize`].
        image_size (`int`, defaults to 224):
            The shorter image side is resized to this (bicubic), then the centre `image_size`² square is kept.
        image_mean (`tuple[float, float, float]`, defaults to CLIP's `(0.48145466, 0.4578275, 0.40821073)`):
            Per-channel mean subtracted from the `[0, 1]` RGB values.
        image_std (`tuple[float, float, float]`, defaults to CLIP's `(0.26862954, 0.26130258, 0.27577711)`):
            Per-channel standard deviation the values are divided by.
        sampling_rate (`int`, defaults to 16000):
            Audio is resampled to this rate (Hz) before clip sampling and the filterbank.
        clip_duration (`float`, defaults to 2.0):
            Length in seconds of each audio clip.
        clips_per_audio (`int`, defaults to 3):
            Number of clips taken from each audio input, starting at evenly spaced times from 0 to
            `duration - clip_duration` (all at 0 when the audio is shorter than one clip, which then covers the whole
            audio).
        num_mel_bins (`int`, defaults to 128):
            Mel filterbank channels.
        target_length (`int`, defaults to 204):
            Frames per clip: the filterbank is zero-padded on the right or cropped to this many frames.
        frame_length_ms (`float`, defaults to 25.0):
            Filterbank analysis window length in milliseconds.
        frame_shift_ms (`float`, defaults to 10.0):
            Filterbank hop in milliseconds.
        audio_mean (`float`, defaults to -4.268):
            Mean subtracted from the log-mel values (after padding, so padded frames become `-audio_mean/audio_std`).
        audio_std (`float`, defaults to 9.138):
            Standard deviation the log-mel values are divided by.
        audio_channel (`str`, defaults to `"first"`):
            How multi-channel audio becomes one channel. `"first"` is what Meta's code effectively does: each clip's
            mean over *all* channels is subtracted and kaldi's fbank then reads only channel 0. `"mean"` averages the
            channels first (a true mono mix; not what the released model saw for stereo input).
        context_length (`int`, defaults to 77):
            Text sequence length (start token + BPE tokens + end token + zero padding).
    """

    def __init__(
        self,
        tokenizer: Any | None = None,
        image_size: int = 224,
        image_mean: Sequence[float] = CLIP_IMAGE_MEAN,
        image_std: Sequence[float] = CLIP_IMAGE_STD,
        sampling_rate: int = 16000,
        clip_duration: float = 2.0,
        clips_per_audio: int = 3,
        num_mel_bins: int = 128,
        target_length: int = 204,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        audio_mean: float = -4.268,
        audio_std: float = 9.138,
        audio_channel: str = "first",
        context_length: int = 77,
    ):
        for name, value in (
            ("image_size", image_size),
            ("sampling_rate", sampling_rate),
            ("clips_per_audio", clips_per_audio),
            ("num_mel_bins", num_mel_bins),
            ("target_length", target_length),
            ("context_length", context_length),
        ):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if context_length < 2:
            raise ValueError(f"`context_length` must be at least 2 (start and end tokens), got {context_length}.")
        for name, value in (
            ("clip_duration", clip_duration),
            ("frame_length_ms", frame_length_ms),
            ("frame_shift_ms", frame_shift_ms),
            ("audio_std", audio_std),
        ):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        for name, value in (("image_mean", image_mean), ("image_std", image_std)):
            if len(value) != 3:
                raise ValueError(f"`{name}` must have 3 values (R, G, B), got {value!r}.")
        if any(s <= 0 for s in image_std):
            raise ValueError(f"`image_std` must be positive, got {image_std!r}.")
        if audio_channel not in ("first", "mean"):
            raise ValueError(f"`audio_channel` must be 'first' or 'mean', got {audio_channel!r}.")

        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.sampling_rate = int(sampling_rate)
        self.clip_duration = clip_duration
        self.clips_per_audio = int(clips_per_audio)
        self.num_mel_bins = int(num_mel_bins)
        self.target_length = int(target_length)
        self.frame_length_ms = float(frame_length_ms)
        self.frame_shift_ms = float(frame_shift_ms)
        self.audio_mean = float(audio_mean)
        self.audio_std = float(audio_std)
        self.audio_channel = audio_channel
        self.context_length = int(context_length)

    @classmethod
    def for_model(cls, model, tokenizer: Any | None = None, **kwargs) -> "ImageBindProcessor":
        """A processor producing the input sizes of ``model`` (an `ImageBindModel`): image size, mel bins, frames and
        text context length come from its config; other settings keep Meta's defaults unless given."""
        config = model.config
        sizes = dict(
            image_size=config.vision_image_size,
            num_mel_bins=config.audio_num_mel_bins,
            target_length=config.audio_target_length,
            context_length=config.text_context_length,
        )
        return cls(tokenizer=tokenizer, **{**sizes, **kwargs})

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "tokenizer")
        tok = type(self.tokenizer).__name__ if self.tokenizer is not None else None
        return f"{type(self).__name__}(tokenizer={tok}, {settings})"

    # ------------------------------------------------------------------ images

    @torch.no_grad()
    def preprocess_image(self, images: ImageInput | Sequence[ImageInput]) -> torch.FloatTensor:
        """
        Resize, centre-crop and normalise images like Meta's `load_and_transform_vision_data`.

        Args:
            images:
                One image or a list of images (types may be mixed). Each is a `PIL.Image.Image` (any mode; converted
                to RGB), a path to an image file, a numpy array `(H, W)` / `(H, W, C)` or a torch tensor `(H, W)` /
                `(C, H, W)` with C in {1, 3, 4} (4 = RGBA, alpha dropped as PIL does), either `uint8` or floating point
                in `[0, 1]`. A 4-D array `(B, H, W, C)` / tensor `(B, C, H, W)` is a batch. Floating-point images are
                quantised to 8 bits (`round(x * 255)`) first, i.e. treated exactly like the same image saved as an
                8-bit PNG, which is what the reference (and the released model) sees.

        Returns:
            `torch.FloatTensor` of shape `(batch, 3, image_size, image_size)`.
        """
        pil_images = [self.load_image(img) for img in self._image_list(images)]
        return torch.stack([self._transform_pil(img) for img in pil_images])

    def _image_list(self, images) -> list:
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("`images` is an empty list.")
            out = []
            for img in images:
                if isinstance(img, (list, tuple)):
                    raise TypeError("`images` must be an image or a flat list of images, got a nested list.")
                out.extend(self._image_list(img))
            return out
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        return [images]

    def load_image(self, image: ImageInput) -> PIL.Image.Image:
        """One image input (any type `preprocess_image` accepts, not a batch) as a new RGB PIL image.

        The caller's object is never modified. Raises `TypeError`/`ValueError` naming `images` on bad input.
        """
        if isinstance(image, PIL.Image.Image):
            pil = image
        elif isinstance(image, (str, os.PathLike)):
            pil = _open_image(image)
        elif isinstance(image, torch.Tensor):
            shape = tuple(image.shape)
            if image.ndim == 3:
                image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C); a view, the caller's tensor is untouched
            pil = _array_to_pil(image.detach().cpu().numpy(), "tensor", "(C, H, W)", shape)
        elif isinstance(image, np.ndarray):
            pil = _array_to_pil(image, "array", "(H, W, C)", image.shape)
        else:
            raise TypeError(
                "`images`: expected PIL images, paths, numpy arrays or torch tensors, got "
                f"{type(image).__module__}.{type(image).__name__}."
            )
        if pil.width == 0 or pil.height == 0:
            raise ValueError(f"`images`: image has no pixels (size {pil.width}x{pil.height}).")
        # The caller's image is not changed: convert() returns a new image (a copy even when already RGB).
        return pil.convert("RGB")

    def _transform_pil(self, image: PIL.Image.Image) -> torch.Tensor:
        # torchvision.transforms.Resize(int) on a PIL image: shorter side -> size, longer side truncated.
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.image_size * long / short)
        new_w, new_h = (self.image_size, new_long) if w <= h else (new_long, self.image_size)
        image = image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
        # torchvision's CenterCrop offsets (Python's round, i.e. half to even).
        top = int(round((new_h - self.image_size) / 2.0))
        left = int(round((new_w - self.image_size) / 2.0))
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype)[:, None, None]
        std = torch.tensor(self.image_std, dtype=pixels.dtype)[:, None, None]
        return pixels.sub(mean).div(std)

    # ------------------------------------------------------------------- audio

    def load_audio(self, audio: AudioInput) -> tuple[torch.Tensor, int]:
        """
        Read or validate one audio input.

        Args:
            audio:
                A path to an audio file soundfile can read (WAV, FLAC, OGG/Vorbis, MP3 with libsndfile >= 1.1), or a
                tuple `(waveform, sample_rate)` where `waveform` is a floating-point numpy array or torch tensor of
                shape `(samples,)` or `(channels, samples)` and `sample_rate` a positive integer (Hz).

        Returns:
            `tuple[torch.Tensor, int]`: a new float32 tensor of shape `(channels, samples)` (file samples scaled to
            `[-1, 1]` as soundfile/torchaudio do) and its sample rate.
        """
        if isinstance(audio, (str, os.PathLike)):
            return _read_audio_file(audio)
        if isinstance(audio, tuple) and len(audio) == 2:
            return _validate_waveform(*audio)
        raise TypeError(
            "`audio`: expected a path or a `(waveform, sample_rate)` tuple, got "
            f"{type(audio).__module__}.{type(audio).__name__}."
        )

    @torch.no_grad()
    def preprocess_audio(self, audio: AudioInput | Sequence[AudioInput]) -> torch.FloatTensor:
        """
        Turn audio into ImageBind's normalised log-mel clips like Meta's `load_and_transform_audio_data`.

        Args:
            audio:
                One audio input or a list of them; each is a path or a `(waveform, sample_rate)` tuple (see
                [`load_audio`]). Any sample rate and channel count; see `audio_channel` for how channels are combined.

        Returns:
            `torch.FloatTensor` of shape `(batch, clips_per_audio, 1, num_mel_bins, target_length)`.
        """
        if is_single_audio(audio):
            audio = [audio]
        elif not isinstance(audio, (list, tuple)):
            raise TypeError(
                "`audio`: expected a path, a `(waveform, sample_rate)` tuple or a list of them, got "
                f"{type(audio).__module__}.{type(audio).__name__}."
            )
        if len(audio) == 0:
            raise ValueError("`audio` is an empty list.")
        return torch.stack([self._audio_to_features(*self.load_audio(a)) for a in audio])

    def _audio_to_features(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        if self.audio_channel == "mean":
            waveform = waveform.mean(dim=0, keepdim=True)
        if sample_rate != self.sampling_rate:
            waveform = torchaudio.functional.resample(waveform, orig_freq=sample_rate, new_freq=self.sampling_rate)
        else:
            waveform = waveform.clone()  # clip offsets are removed in place below
        num_samples = waveform.shape[1]
        window = int(self.sampling_rate * self.frame_length_ms / 1000)
        if num_samples < window:
            raise ValueError(
                f"`audio` is too short: {num_samples} samples at {self.sampling_rate} Hz after resampling, but one "
                f"filterbank frame needs {window} ({self.frame_length_ms:g} ms)."
            )
        mean = torch.tensor(self.audio_mean, dtype=waveform.dtype)
        std = torch.tensor(self.audio_std, dtype=waveform.dtype)
        clips = []
        for start, end in self.clip_boundaries(num_samples):
            clip = waveform[:, start:end]
            # In place on purpose: the reference removes each clip's mean in place on the shared waveform, so
            # overlapping clips see the offsets of earlier ones. Kept for bit-exact parity (kaldi's per-frame DC
            # removal makes the effect rounding-sized).
            clip -= clip.mean()
            fbank = torchaudio.compliance.kaldi.fbank(
                clip[:1],  # kaldi reads only channel 0
                htk_compat=True,
                sample_frequency=self.sampling_rate,
                use_energy=False,
                window_type="hanning",
                num_mel_bins=self.num_mel_bins,
                dither=0.0,
                frame_length=self.frame_length_ms,
                frame_shift=self.frame_shift_ms,
            ).T  # (mel, frames)
            pad = self.target_length - fbank.shape[1]
            fbank = torch.nn.functional.pad(fbank, (0, pad)) if pad > 0 else fbank[:, : self.target_length]
            clips.append(((fbank - mean) / std).unsqueeze(0))
        return torch.stack(clips)

    def clip_boundaries(self, num_samples: int) -> list[tuple[int, int]]:
        """
        Sample ranges `[start, end)` of the audio clips for a waveform of `num_samples` samples at `sampling_rate`.

        Follows pytorchvideo's `ConstantClipsPerVideoSampler` as Meta calls it, including its arithmetic (float
        duration, exact fractions for the clip times, truncation to sample indices): clip `i` starts at
        `i * max(duration - clip_duration, 0) / clips_per_audio` seconds and lasts `clip_duration` (cut at the end
        of the audio). The last clip therefore ends before the end of audio longer than `clips_per_audio` clips.

        Args:
            num_samples (`int`): length of the (resampled) waveform.

        Returns:
            `list[tuple[int, int]]` with `clips_per_audio` entries.
        """
        duration = num_samples / self.sampling_rate
        clip_duration = Fraction(self.clip_duration)
        step = Fraction(max(duration - clip_duration, 0)) / self.clips_per_audio
        bounds = []
        for i in range(self.clips_per_audio):
            start = step * i
            bounds.append((int(start * self.sampling_rate), int((start + clip_duration) * self.sampling_rate)))
        return bounds

    # -------------------------------------------------------------------- text

    def tokenize(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """
        Tokenize text like Meta's `SimpleTokenizer`: `<|startoftext|>`, the BPE ids, `<|endoftext|>`, zeros.

        The text is cleaned as Meta does before BPE: `ftfy.fix_text` (only when `ftfy` is installed; it repairs
        mojibake, which is rare in ordinary text), HTML entities unescaped, whitespace collapsed and stripped,
        lower-cased. Sequences longer than `context_length` are cut and end with `<|endoftext|>`.

        Args:
            texts (`str` or `list[str]`): one text or a list of texts.

        Returns:
            `torch.LongTensor` of shape `(batch, context_length)`.
        """
        if self.tokenizer is None:
            raise ValueError(
                "`tokenize` needs a CLIP BPE tokenizer: pass `tokenizer=` to ImageBindProcessor, e.g. "
                "`clip_tokenizer_from_bpe('bpe_simple_vocab_16e6.txt.gz')` or a transformers `CLIPTokenizer`."
            )
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"`texts` must be a string or a list of strings, got {texts!r:.80}.")
        if len(texts) == 0:
            raise ValueError("`texts` is an empty list.")
        sot, eot = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if sot is None or eot is None:
            raise ValueError(
                f"The tokenizer ({type(self.tokenizer).__name__}) has no bos/eos token; a CLIP BPE tokenizer "
                "with `<|startoftext|>` and `<|endoftext|>` is needed."
            )
        encoded = self.tokenizer([_clean_text(t) for t in texts], add_special_tokens=False, verbose=False)
        input_ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, ids in zip(input_ids, encoded["input_ids"], strict=True):
            ids = ([sot] + list(ids))[: self.context_length - 1] + [eot]
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return input_ids

    # -------------------------------------------------------------------- all

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        audio: AudioInput | Sequence[AudioInput] | None = None,
        text: str | Sequence[str] | None = None,
    ) -> ImageBindProcessorOutput:
        """
        Preprocess any combination of images, audio and text.

        Args:
            images: see [`preprocess_image`].
            audio: see [`preprocess_audio`].
            text: see [`tokenize`].

        Returns:
            [`ImageBindProcessorOutput`] (a dict) with `pixel_values`, `audio_features` and/or `input_ids` for the
            modalities given.
        """
        if images is None and audio is None and text is None:
            raise ValueError("Pass at least one of `images`, `audio` or `text`.")
        return ImageBindProcessorOutput(
            pixel_values=self.preprocess_image(images) if images is not None else None,
            audio_features=self.preprocess_audio(audio) if audio is not None else None,
            input_ids=self.tokenize(text) if text is not None else None,
        )


# ---------------------------------------------------------------------- helpers


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _open_image(path: str | os.PathLike) -> PIL.Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`images`: image file not found: {os.fspath(path)!r}")
    try:
        with PIL.Image.open(path) as img:
            return img.convert("RGB")  # decodes now, while the file is open, so read errors surface here
    except (OSError, PIL.UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"`images`: could not read image file {os.fspath(path)!r}: {e}") from e


def _array_to_pil(array: np.ndarray, kind: str, layout: str, shape: tuple) -> PIL.Image.Image:
    """(H, W) or (H, W, C) uint8 / float-in-[0, 1] array -> PIL image; `shape` is the caller's, for messages."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"`images`: a {kind} must be {layout} with 1, 3 or 4 channels (or 2-D grayscale), got shape {shape}."
        )
    if array.size == 0:
        raise ValueError(f"`images`: image has no pixels (shape {shape}).")
    if array.dtype == np.uint8:
        quantised = array
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (low >= 0.0 and high <= 1.0):  # also catches NaN
            raise ValueError(
                f"`images`: floating-point images must have values in [0, 1], got min {low:g}, max {high:g}."
            )
        quantised = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise TypeError(f"`images`: {kind} dtype must be uint8 or floating point in [0, 1], got {array.dtype}.")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[2 if quantised.ndim == 2 else quantised.shape[-1]]
    return PIL.Image.fromarray(np.ascontiguousarray(quantised), mode=mode)


def is_single_audio(audio) -> bool:
    """Whether ``audio`` is one clip: a path, or a 2-tuple ``(waveform, sample_rate)`` (other tuples are batches)."""
    return isinstance(audio, (str, os.PathLike)) or (
        isinstance(audio, tuple)
        and len(audio) == 2
        and (isinstance(audio[0], (np.ndarray, torch.Tensor)) or isinstance(audio[1], numbers.Number))
    )


def _read_audio_file(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`audio`: audio file not found: {os.fspath(path)!r}")
    try:
        data, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise ValueError(f"`audio`: could not read audio file {os.fspath(path)!r}: {e}") from e
    return _validate_waveform(torch.from_numpy(data.T), sample_rate, source=f"audio file {os.fspath(path)!r}")


def _validate_waveform(waveform, sample_rate, source: str = "waveform") -> tuple[torch.Tensor, int]:
    if not _is_int(sample_rate) or sample_rate <= 0:
        raise ValueError(f"`audio`: sample rate must be a positive integer (Hz), got {sample_rate!r}.")
    if isinstance(waveform, np.ndarray):
        if not np.issubdtype(waveform.dtype, np.floating):
            raise TypeError(f"`audio`: waveform must be floating point, got dtype {waveform.dtype}.")
        waveform = torch.from_numpy(waveform)
    elif isinstance(waveform, torch.Tensor):
        if not waveform.is_floating_point():
            raise TypeError(f"`audio`: waveform must be floating point, got dtype {waveform.dtype}.")
    else:
        raise TypeError(
            "`audio`: waveform must be a numpy array or a torch tensor, got "
            f"{type(waveform).__module__}.{type(waveform).__name__}."
        )
    if waveform.ndim == 1:
        waveform = waveform.unsqueeze(0)
    if waveform.ndim != 2:
        raise ValueError(
            f"`audio`: waveform must be (samples,) or (channels, samples), got shape {tuple(waveform.shape)}."
        )
    if waveform.shape[0] == 0 or waveform.shape[1] == 0:
        raise ValueError(f"`audio`: {source} is empty (shape (channels, samples) = {tuple(waveform.shape)}).")
    # A contiguous float32 copy (never the caller's memory), laid out like torchaudio.load's output: the clip means
    # are sums whose rounding depends on the memory order, and the reference's layout is (channels, samples).
    waveform = waveform.detach().to(device="cpu", dtype=torch.float32).clone(memory_format=torch.contiguous_format)
    if not torch.isfinite(waveform).all():
        raise ValueError(f"`audio`: {source} contains NaN or infinite samples.")
    return waveform, int(sample_rate)


_WHITESPACE = re.compile(r"\s+")


def _clean_text(text: str) -> str:
    # Meta's cleaning (ftfy, double HTML unescape, whitespace collapse, lower case); ftfy is optional.
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()
