#!/usr/bin/env python
"""Per-stage wall time of InstructAny2PixPipeline on tiny components, and the LLM with / without KV cache.

    python benchmarks/bench_pipeline.py [--family imagebind|sd|sdxl] [--steps 25] [--repeats 3]

Stages are timed by wrapping the pipeline's stage entry points (ImageBind encoding, LLM generate, prior, VAE encode,
DDIM inversion, VAE decode); "denoise" is the rest of the call. The KV-cache comparison generates exactly
``--new_tokens`` tokens (end-of-sequence suppressed) with a small Llama (hidden 256, 4 layers), greedy.
"""

import argparse
import functools
import statistics
import time
from collections import defaultdict

import numpy as np
import PIL.Image
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList, SuppressTokensLogitsProcessor

from diffusers_any2pix import InstructAny2PixPipeline, MultimodalAdapter, add_multimodal_tokens
from diffusers_any2pix.multimodal_llm import build_vicuna_prompt, generate_with_media
from diffusers_any2pix.testing_utils import tiny_llm_tokenizer, tiny_pipeline_components


def timed(store: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[name] += time.perf_counter() - start

    return wrapper


def bench_stages(family: str, steps: int, repeats: int) -> None:
    pipe = InstructAny2PixPipeline(**tiny_pipeline_components(family))
    pipe.set_progress_bar_config(disable=True)
    store: dict = defaultdict(float)
    pipe.encode_media = timed(store, "encode (ImageBind)", pipe.encode_media)
    pipe.llm.generate = timed(store, "LLM generate", pipe.llm.generate)
    pipe.prior.refine = timed(store, "prior", pipe.prior.refine)
    pipe.vae.encode = timed(store, "VAE encode", pipe.vae.encode)
    pipe.invert = timed(store, "DDIM inversion", pipe.invert)
    pipe.vae.decode = timed(store, "VAE decode", pipe.vae.decode)
    image = PIL.Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    clip = (np.sin(np.arange(32000) * 0.05).astype("float32"), 16000)

    def call():
        pipe("add [audio1] to [image1]", images=[image], audio=[clip], num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0))  # fmt: skip

    call()  # warm-up
    totals, per_stage = [], defaultdict(list)
    for _ in range(repeats):
        store.clear()
        start = time.perf_counter()
        call()
        total = time.perf_counter() - start
        totals.append(total)
        for name, value in store.items():
            per_stage[name].append(value)
        per_stage["denoise (UNet loop)"].append(total - sum(store.values()))
    print(f"\nPer-stage wall time, tiny {family} pipeline, {steps} steps, median of {repeats} (ms):")
    for name, values in per_stage.items():
        print(f"  {name:<22} {1000 * statistics.median(values):9.1f}")
    print(f"  {'total':<22} {1000 * statistics.median(totals):9.1f}")


def bench_kv_cache(new_tokens: int, repeats: int) -> None:
    torch.manual_seed(0)
    tokenizer = tiny_llm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 16, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
    )  # fmt: skip
    llm = LlamaForCausalLM(config).eval()
    ids = add_multimodal_tokens(tokenizer, llm)
    adapter = MultimodalAdapter(embed_dim=16, llm_hidden_size=256).eval()
    never_stop = LogitsProcessorList([SuppressTokensLogitsProcessor([ids.eos])])
    prompt = [build_vicuna_prompt("add <video> to <video>")]
    media = [torch.randn(2, 16)]
    print(f"\nLLM generation, {new_tokens} new tokens, Llama 4×256, greedy, median of {repeats} (ms):")
    results = {}
    for use_cache in (True, False):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = generate_with_media(
                llm, tokenizer, adapter, prompt, media, token_ids=ids, do_sample=False,
                max_new_tokens=new_tokens, use_cache=use_cache, logits_processor=never_stop,
            )  # fmt: skip
            times.append(time.perf_counter() - start)
        assert out.sequences.shape[1] == new_tokens
        results[use_cache] = out.sequences
        print(f"  use_cache={use_cache!s:<5} {1000 * statistics.median(times):9.1f}")
    print(f"  identical tokens: {torch.equal(results[True], results[False])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["imagebind", "sd", "sdxl"], default="imagebind")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=100)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_stages(args.family, args.steps, args.repeats)
    bench_kv_cache(args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
