"""Tiny random models of every supported family, built in memory, for tests and controls.

`tiny_model` can plant a massive activation at a chosen layer and dim through the
weights, so a detector has a known truth by construction:

- pre-norm families (Llama, Mistral, Qwen2, Qwen3, Phi-3): one FFN neuron reads a
  single input dim and writes ``scale`` times its activation into ``dim`` through
  ``down_proj``;
- families that normalise the MLP output (Gemma 2, Gemma 3, OLMo-2): the post-FFN norm
  gain of ``dim`` is set to ``scale``, which is how Gemma 3 270M makes its own.

The tokenizer is character-level and prepends ``<s>``, so position 0 is always BOS.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from mechme.models.loaded import LoadedModel, tensor_sha256

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "olmo2")
SPECIALS = ["<pad>", "<s>", "</s>"]


@dataclass(frozen=True, kw_only=True)
class Plant:
    """A massive activation to plant: written at ``layer`` into ``dim``."""

    layer: int
    dim: int
    scale: float = 2.0e4
    neuron: int = 0


def tiny_tokenizer():
    """Return a character-level fast tokenizer that needs no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def tiny_config(family: str, *, n_layers: int = 4, vocab_size: int = 128):
    """Return a small config of ``family`` (hidden 64, 4 heads, 2 KV heads, FFN 128)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    classes = {
        "llama": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "phi3": "Phi3Config",
        "gemma2": "Gemma2Config",
        "gemma3": "Gemma3TextConfig",
        "olmo2": "Olmo2Config",
    }
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    extra = {}
    if family in ("qwen3", "gemma2", "gemma3"):
        extra["head_dim"] = 16
    if family in ("gemma2", "gemma3"):
        extra.update(query_pre_attn_scalar=16, sliding_window=64)
    if family == "phi3":
        extra.update(original_max_position_embeddings=512)
    return getattr(transformers, classes[family])(**common, **extra)


def tiny_model(family: str = "llama", *, seed: int = 0, plant: Plant | None = None, n_layers: int = 4) -> LoadedModel:
    """Build a random model of ``family`` in memory, optionally with a planted massive activation."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, n_layers=n_layers)
    model = AutoModelForCausalLM.from_config(config).eval()
    loaded = LoadedModel(ref=f"tiny-{family}", model=model, tokenizer=tiny_tokenizer())
    if plant is not None:
        plant_massive(loaded, plant)
    loaded.weights_sha256 = tensor_sha256(model)
    return loaded


@torch.no_grad()
def plant_massive(loaded: LoadedModel, plant: Plant) -> None:
    """Edit the weights so that ``plant.layer`` writes a massive value into ``plant.dim``."""
    loaded.check_layer(plant.layer)
    if "mlp_post_norm" in loaded.arch.norms:
        norm = loaded.norm_module(plant.layer, "mlp_post_norm")
        norm.weight[plant.dim] = plant.scale - loaded.arch.gain_offset
        return
    layout = loaded.arch.mlp
    n, source = plant.neuron, (plant.dim + 1) % loaded.d_model
    read = torch.zeros(loaded.d_model)
    read[source] = 4.0
    if layout.gate_up is not None:
        fused = loaded.submodule(plant.layer, layout.gate_up).weight
        fused[n] = read
        fused[loaded.d_mlp + n] = read
    else:
        loaded.submodule(plant.layer, layout.gate).weight[n] = read
        loaded.submodule(plant.layer, layout.up).weight[n] = read
    down = loaded.submodule(plant.layer, layout.down).weight
    down[:, n] = 0.0
    down[plant.dim, n] = plant.scale
