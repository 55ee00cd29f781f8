"""Packaging for diffusers-any2pix (InstructAny2Pix as a diffusers pipeline package)."""

from setuptools import find_packages, setup

setup(
    name="diffusers-any2pix",
    version="0.1.0.dev0",
    description="InstructAny2Pix: multimodal (text + images + audio) instruction-following image editing as a diffusers pipeline",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "torchaudio>=2.4,<2.12",
        "diffusers>=0.42,<0.43",
        "transformers>=5.0,<6",
        "accelerate>=1.10,<2",
        "safetensors>=0.4",
        "huggingface_hub>=0.34",
        "numpy>=1.26",
        "pillow>=10",
        "soundfile>=0.12",
        "ftfy",  # exact CLIP text cleaning in ImageBindProcessor.tokenize
        "regex",
        "tqdm",
    ],
    extras_require={
        "training": ["peft>=0.15", "tensorboard"],
        # The official release's Llama tokenizer is a SentencePiece model (convert_official).
        "convert": ["sentencepiece", "protobuf"],
        # The ImageBind reference is a test oracle only (CC-BY-NC-SA); it is installed with --no-deps by .ci/run.
        "test": ["pytest>=8", "timm>=1.0", "iopath", "einops", "peft>=0.15", "sentencepiece", "protobuf"],
    },
)
