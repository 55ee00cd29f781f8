"""diffusers-any2pix: InstructAny2Pix (text + images + audio instructions → image edits) for diffusers."""

__version__ = "0.1.0.dev0"
