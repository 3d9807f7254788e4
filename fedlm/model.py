"""Loading a base causal LM (embedded, local or hub) and putting a LoRA adapter on it."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedlm.adapter import freeze_lora_a
from fedlm.embedded import ensure_embedded_base
from fedlm.settings import ConfigError, LoraSettings, ModelSettings, check_client_rank

# All linear projections of the attention and MLP blocks (never lm_head): what LoRA needs to adapt
# these architectures well; PEFT's defaults cover only q/v.
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TARGETS: dict[str, tuple[str, ...]] = {
    **{kind: _LLAMA_STYLE for kind in ("llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma",
                                       "gemma2", "phi3", "olmo", "olmo2", "smollm3", "granite")},
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
_FAN_IN_FAN_OUT = {"gpt2"}  # GPT-2 stores its projections as Conv1D (in, out): PEFT must transpose.

# Every client process loads a model: keep their logs to what matters (PEFT 0.21 still calls a
# transformers 5 method that warns on each use).
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def default_cache_root() -> Path:
    """Where built base models live between runs."""
    return Path(os.environ.get("POLLINATE_CACHE", Path.home() / ".cache" / "pollinate")).expanduser()


def resolve_model_path(settings: ModelSettings, cache_root: Path | str | None = None) -> str:
    """The directory or hub id `from_pretrained` should load; builds the embedded base if needed."""
    if settings.name_or_path == "embedded":
        root = Path(cache_root) if cache_root else default_cache_root()  # "" in settings: the default
        return str(ensure_embedded_base(settings.embedded, root))
    path = Path(settings.name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={settings.name_or_path!r} has no config.json; point it at "
                              "a directory written by save_pretrained(), or use `embedded`")
        return str(path)
    return settings.name_or_path  # a hub id: only users with network get past from_pretrained


def _unloadable(settings: ModelSettings, err: Exception) -> ConfigError:
    return ConfigError(
        f"model.name_or_path={settings.name_or_path!r} could not be loaded ({str(err).splitlines()[0]}); "
        "use `embedded`, a local directory holding a saved causal LM, or a hub id with network access")


def load_tokenizer(settings: ModelSettings, cache_root: Path | str | None = None) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a padding token.

    Raises:
        ConfigError: it cannot be loaded (unknown id, no network, bad folder).
    """
    source = resolve_model_path(settings, cache_root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _unloadable(settings, err) from None
    if tokenizer.pad_token_id is None:  # GPT-2 and friends ship none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model(settings: ModelSettings, lora: LoraSettings, seq_len: int,
                cache_root: Path | str | None = None) -> None:
    """Refuse a model that cannot take this run, from its config alone: the architecture is built on the meta
    device (no weights are read or allocated) and the adapter put on it, so a wrong lora.target_modules or a
    dataset.seq_len past the model's context fails here, before any data is prepared.

    Raises:
        ConfigError: naming the setting and the fix; or the config cannot be loaded.
    """
    source = resolve_model_path(settings, cache_root)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _unloadable(settings, err) from None
    # GPT-2 indexes a position table (an IndexError mid-training); RoPE models would run on, untrained there.
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(context, int) and seq_len > context:
        raise ConfigError(f"dataset.seq_len={seq_len} exceeds the context of model.name_or_path="
                          f"{settings.name_or_path!r} ({context} tokens); set dataset.seq_len<={context}")
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
        except (OSError, ValueError) as err:
            raise _unloadable(settings, err) from None
        apply_lora(model, lora, seed=0)


def load_base_model(settings: ModelSettings, cache_root: Path | str | None = None
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and its tokenizer through the real `from_pretrained` path.

    Raises:
        ConfigError: the model or tokenizer cannot be loaded (unknown id, no network, bad folder).
    """
    tokenizer = load_tokenizer(settings, cache_root)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(settings, cache_root), dtype=getattr(torch, settings.dtype),
            trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _unloadable(settings, err) from None
    return model, tokenizer


def lora_targets(model: PreTrainedModel, settings: LoraSettings) -> list[str] | str:
    """The module names LoRA wraps: configured, per architecture, or PEFT's all-linear fallback."""
    if settings.target_modules:
        return list(settings.target_modules)
    return list(_TARGETS.get(model.config.model_type, ())) or "all-linear"


def apply_lora(model: PreTrainedModel, settings: LoraSettings, seed: int, frozen_a: bool = False,
               rank: int | None = None) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter; A is drawn from `seed` so every party builds the same one.

    `frozen_a` (FFA-LoRA): A stays fixed; only B is trained (and sent: fedlm.adapter.WireFormat).
    `rank` (heterogeneous ranks, <= settings.r): this party trains a smaller adapter; its WireFormat keeps the
    global rank settings.r (truncated on the way in, zero-padded on the way out).
    """
    model_type = model.config.model_type
    rank = check_client_rank(rank or settings.r, settings.r, "lora rank")
    # PEFT scales B @ A by lora_alpha / r. With alpha * rank / r_max every client's scale is alpha / r_max,
    # the global adapter's: a zero-padded rank-r_i (B, A) then means exactly the same delta-W inside the
    # global adapter as in the client's, so the weighted sum of padded arrays is a sum of like quantities.
    config = LoraConfig(
        r=rank, lora_alpha=settings.alpha * rank / settings.r, lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings), task_type="CAUSAL_LM",
        fan_in_fan_out=model_type in _FAN_IN_FAN_OUT,
    )
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules={settings.target_modules!r} does not fit this "
                          f"{model_type} model ({err}); leave it empty to choose per architecture") from None
    if frozen_a:
        freeze_lora_a(peft_model)
    return peft_model
