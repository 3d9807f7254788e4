"""`python -m simulations.sample RUN_DIR --prompt TEXT`: what the federation taught the model, side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

from fedlm.model import load_base_model
from fedlm.settings import ConfigError, RunSettings


def generate(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_k=50 if temperature > 0 else None,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run's output directory (holds settings.json and adapter/)")
    parser.add_argument("--prompt", default="import os\n\n\ndef ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings_file, adapter_dir = args.run_dir / "settings.json", args.run_dir / "adapter"
    if not settings_file.is_file() or not (adapter_dir / "adapter_config.json").is_file():
        sys.exit(f"{args.run_dir} is not a finished run: it needs settings.json and adapter/ "
                 "(pass the output directory that `python -m simulations.run` printed)")
    try:
        settings = RunSettings.from_json(settings_file.read_text())
        base, tokenizer = load_base_model(settings.model, settings.cache_dir)
    except (ConfigError, json.JSONDecodeError) as err:
        sys.exit(f"{settings_file}: {err}")
    before = generate(base, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    after = generate(tuned, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    print(f"--- prompt ---\n{args.prompt}\n--- base model ---\n{before}\n--- base + federated adapter ---\n{after}")


if __name__ == "__main__":
    main()
