"""Prompts per second: our CLIPTokenizer against transformers' CLIP tokenizers.

    .venv/bin/python benchmarks/tokenizer_speed.py [--prompts 10000] [--repeat 3]

Two workloads: typical ASCII prompts (our pure-Python fast path) and prompts with
accents, CJK and emoji (our full tokenizers pipeline). Every tokenizer pads and
truncates to 77 and returns a [B, 77] tensor; the ids are checked to be identical.
transformers 5 has no slow (pure-Python) CLIPTokenizer; it is timed where it exists.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_jobs.model.tokenizer import DATA_DIR, CLIPTokenizer  # noqa: E402

SUBJECTS = [
    "a photograph of an astronaut riding a horse", "a red fox in the snow", "portrait of an old man",
    "a castle on a hill", "two cats sleeping on a sofa", "the Eiffel Tower at night",
    "an isometric pixel-art city", "a bowl of ramen", "a robot playing chess", "a koi pond",
]
STYLES = [
    "highly detailed", "8k", "trending on artstation", "by Greg Rutkowski", "oil on canvas",
    "octane render", "f/1.8, 35mm", "(masterpiece:1.2)", "cinematic lighting", "it's raining",
]
UNICODE = ["café crème", "Ærøskøbing", "東京タワー", "一幅山水画", "😀🚀", "Москва зимой", "naïve résumé"]


def make_prompts(n: int, unicode: bool, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = SUBJECTS + STYLES + (UNICODE * 3 if unicode else [])
    return [", ".join(rng.choice(pool) for _ in range(rng.randint(1, 10))) for _ in range(n)]


def best_seconds(fn, prompts: list[str], repeat: int) -> tuple[float, torch.Tensor]:
    fn(prompts[:100])  # warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(prompts)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    ours = CLIPTokenizer.default()
    candidates = {"ours (model.tokenizer)": ours}
    try:
        import transformers

        vocab, merges = str(DATA_DIR / "vocab.json"), str(DATA_DIR / "merges.txt")
        fast = transformers.CLIPTokenizerFast(vocab, merges)
        candidates[f"transformers {transformers.__version__} fast"] = fast
        slow_cls = transformers.CLIPTokenizer
        if slow_cls is not transformers.CLIPTokenizerFast:
            candidates[f"transformers {transformers.__version__} slow"] = slow_cls(vocab, merges)
        else:
            print(f"transformers {transformers.__version__} has no slow CLIPTokenizer (removed in 5.x)")
    except ImportError:
        print("transformers is not installed: timing ours only")

    def call(tokenizer):
        if tokenizer is ours:
            return ours
        return lambda p: tokenizer(p, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt")["input_ids"]

    for label, unicode in (("ASCII prompts", False), ("prompts with accents/CJK/emoji", True)):
        prompts = make_prompts(args.prompts, unicode)
        print(f"\n{label}: {len(prompts):,} prompts")
        reference = None
        for name, tokenizer in candidates.items():
            seconds, ids = best_seconds(call(tokenizer), prompts, args.repeat)
            same = "" if reference is None else ("  ids identical" if torch.equal(ids, reference) else "  IDS DIFFER")
            reference = ids if reference is None else reference
            print(f"  {name:34s} {len(prompts) / seconds:>10,.0f} prompts/s  ({seconds * 1000:7.1f} ms){same}")


if __name__ == "__main__":
    main()
