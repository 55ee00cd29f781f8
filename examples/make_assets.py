#!/usr/bin/env python
"""Regenerate the example assets from ShapesWorld: a scene image and an object's sound.

    python examples/make_assets.py
"""

from pathlib import Path

from diffusers_any2pix.shapes.sounds import synthesize_sound, write_sound
from diffusers_any2pix.shapes.world import Scene, SceneObject, caption, render_scene


ASSETS = Path(__file__).resolve().parent / "assets"


def main() -> None:
    ASSETS.mkdir(exist_ok=True)
    scene = Scene(background="striped", objects=(SceneObject("circle", "red", "left"),))
    render_scene(scene, size=64).save(ASSETS / "scene.png")
    # The sound signature of a yellow star (timbre = shape, pitch = colour); nominal clip, no jitter.
    write_sound(ASSETS / "yellow_star.wav", synthesize_sound("star", "yellow"))
    print(f"scene.png: {caption(scene)}; yellow_star.wav: the sound of a yellow star")


if __name__ == "__main__":
    main()
