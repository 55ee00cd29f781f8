"""Procedural sound signatures of ShapesWorld objects: timbre ↔ shape, pitch ↔ colour.

| shape    | timbre                                                            |
|----------|-------------------------------------------------------------------|
| circle   | pure sine                                                         |
| square   | band-limited square wave (odd harmonics, 1/k)                     |
| triangle | band-limited sawtooth (all harmonics, 1/k)                        |
| star     | repeated upward chirps over a whole tone around the pitch, 4 per s|
| cross    | bursts of noise band-passed to the pitch ± 8 %, 5 per s           |

Colours map to pitches a major third (4 semitones) apart, rising with the rainbow: red 220 Hz, orange 277 Hz,
yellow 349 Hz, green 440 Hz, blue 554 Hz, purple 698 Hz. Each clip gets small random jitter (pitch ±25 cents,
level, phases, rhythm ±10 %), far below the spacing between classes, so the clip fully determines the object kind.
"""

from typing import Any, Optional, Union

import numpy as np

from .world import COLOURS, SHAPES, _check_name, article


COLOUR_PITCH_HZ: dict[str, float] = {colour: 220.0 * 2 ** (4 * i / 12) for i, colour in enumerate(COLOURS)}
SHAPE_TIMBRE: dict[str, str] = {
    "circle": "sine",
    "square": "square",
    "triangle": "sawtooth",
    "star": "chirp",
    "cross": "noise_bursts",
}
_PITCH_JITTER_CENTS = 25.0
_RHYTHM_JITTER = 0.1
_FADE_S = 0.01


def _harmonic_tone(f0: float, t: np.ndarray, sample_rate: int, odd_only: bool, phases: np.ndarray) -> np.ndarray:
    """Sum of harmonics k·f0 with amplitude 1/k, stopping below 0.9·Nyquist (band-limited: no aliasing)."""
    ks = np.arange(1, int(0.45 * sample_rate // f0) + 1)
    if odd_only:
        ks = ks[ks % 2 == 1]
    args = 2 * np.pi * f0 * ks[:, None] * t[None, :] + phases[: len(ks), None]
    return (np.sin(args) / ks[:, None]).sum(axis=0)


def _check_sound_settings(sample_rate: Any, duration: Any) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise TypeError(f"`sample_rate` must be an int, got {type(sample_rate).__name__}.")
    if sample_rate < 4000:
        raise ValueError(f"`sample_rate` must be at least 4000 Hz, got {sample_rate}.")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0.25 <= duration <= 60:
        raise ValueError(f"`duration` must be a number of seconds in [0.25, 60], got {duration!r}.")


def synthesize_sound(
    shape: str,
    colour: str,
    sample_rate: int = 16000,
    duration: float = 2.0,
    rng: Optional[Union[np.random.Generator, int]] = None,
) -> np.ndarray:
    """Synthesize the sound of a ``colour`` ``shape``.

    Args:
        shape (`str`): one of `SHAPES`; sets the timbre.
        colour (`str`): one of `COLOURS`; sets the pitch (`COLOUR_PITCH_HZ`).
        sample_rate (`int`, defaults to 16000): samples per second (at least 4000, so every pitch and its
            noise band fit below Nyquist).
        duration (`float`, defaults to 2.0): length in seconds (0.25 to 60).
        rng (`np.random.Generator` or `int`, *optional*): source of the per-clip jitter; an int seeds a new
            generator. ``None`` gives the nominal clip (no jitter), the same on every call.

    Returns:
        `np.ndarray`: mono float32 waveform of ``round(duration * sample_rate)`` samples, peak amplitude ≤ 0.9.
    """
    _check_name(shape, SHAPES, "shape")
    _check_name(colour, COLOURS, "colour")
    _check_sound_settings(sample_rate, duration)
    if rng is not None and not isinstance(rng, (np.random.Generator, int)):
        raise TypeError(f"`rng` must be a numpy Generator, an int seed or None, got {type(rng).__name__}.")

    jitter = rng is not None
    if isinstance(rng, int):
        rng = np.random.default_rng(rng)
    # Without jitter the noise of "cross" still needs a source: a fixed one per class keeps the clip reproducible.
    noise_rng = rng if jitter else np.random.default_rng((SHAPES.index(shape), COLOURS.index(colour)))

    num_samples = int(round(duration * sample_rate))
    t = np.arange(num_samples) / sample_rate
    cents = rng.uniform(-_PITCH_JITTER_CENTS, _PITCH_JITTER_CENTS) if jitter else 0.0
    f0 = COLOUR_PITCH_HZ[colour] * 2 ** (cents / 1200)
    rhythm = 1 + (rng.uniform(-_RHYTHM_JITTER, _RHYTHM_JITTER) if jitter else 0.0)
    phases = rng.uniform(0, 2 * np.pi, size=64) if jitter else np.zeros(64)

    timbre = SHAPE_TIMBRE[shape]
    if timbre == "sine":
        wave = np.sin(2 * np.pi * f0 * t + phases[0])
    elif timbre in ("square", "sawtooth"):
        wave = _harmonic_tone(f0, t, sample_rate, odd_only=timbre == "square", phases=phases)
    elif timbre == "chirp":
        # Exponential sweep over a whole tone centred on f0 (one semitone each way, so the sweep never reaches
        # the neighbouring colours, two semitones further); the phase integrates the instantaneous frequency.
        sweep_position = (t * 4 * rhythm) % 1.0
        frequency = f0 * 2 ** ((2 * sweep_position - 1) / 12)
        wave = np.sin(2 * np.pi * np.cumsum(frequency) / sample_rate + phases[0])
    else:  # noise bursts: white noise band-passed to f0 ± 8 % in the frequency domain, gated on/off.
        spectrum = np.fft.rfft(noise_rng.standard_normal(num_samples))
        freqs = np.fft.rfftfreq(num_samples, 1 / sample_rate)
        spectrum[np.abs(freqs - f0) > 0.08 * f0] = 0
        wave = np.fft.irfft(spectrum, n=num_samples)
        gate_phase = (t * 5 * rhythm + phases[1] / (2 * np.pi)) % 1.0
        # Soft-edged gate, on for half of each period, so bursts start and stop without clicks.
        wave = wave * np.clip(np.sin(2 * np.pi * gate_phase) * 4, 0, 1) ** 2

    fade = min(int(_FADE_S * sample_rate), num_samples // 2)
    envelope = np.ones(num_samples)
    envelope[:fade] = np.linspace(0, 1, fade, endpoint=False)
    envelope[num_samples - fade :] = np.linspace(1, 0, fade)
    wave = wave * envelope
    level = rng.uniform(0.6, 0.9) if jitter else 0.8
    return (wave * (level / max(np.abs(wave).max(), 1e-12))).astype(np.float32)


def sound_caption(shape: str, colour: str, variant: int) -> str:
    """Caption of one recorded variant: ``"the sound of a red star, variant 3"``.

    Several clips of the same kind exist (different jitter); the variant number keeps their captions — which are
    the MM-Inst media keys — distinct.
    """
    _check_name(shape, SHAPES, "shape")
    _check_name(colour, COLOURS, "colour")
    if isinstance(variant, bool) or not isinstance(variant, int) or variant < 0:
        raise ValueError(f"`variant` must be a non-negative int, got {variant!r}.")
    return f"the sound of {article(colour)} {colour} {shape}, variant {variant}"


def write_sound(path: str, waveform: np.ndarray, sample_rate: int = 16000) -> None:
    """Write a mono waveform as 16-bit PCM WAV (or FLAC when ``path`` ends in ``.flac``).

    Args:
        path (`str`): destination file.
        waveform (`np.ndarray`): 1-D float samples in [-1, 1].
        sample_rate (`int`, defaults to 16000): samples per second.
    """
    import soundfile

    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ValueError(f"`waveform` must be 1-D (mono), got shape {waveform.shape}.")
    audio_format = "FLAC" if str(path).lower().endswith(".flac") else "WAV"
    soundfile.write(str(path), waveform, sample_rate, subtype="PCM_16", format=audio_format)
