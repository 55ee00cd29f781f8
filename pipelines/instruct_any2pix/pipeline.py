"""Entry point for `DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/instruct_any2pix",
trust_remote_code=True)`: the pipeline itself lives in the installed `diffusers_any2pix` package."""

from diffusers_any2pix.pipeline_instruct_any2pix import InstructAny2PixPipeline  # noqa: F401
