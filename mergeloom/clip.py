"""open_clip glue: build a CLIP, move image-encoder weights in and out, zero-shot heads, logits.

Everything goes through open_clip's own calls, so the tiny test config and ViT-B-32 with
``pretrained='openai'`` take the same path. Images enter as float tensors in [0, 1] and are
normalized here, so callers never need to know a model's mean and std.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from mergeloom.vectors import check_finite

StateDict = dict[str, torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]
_MAX_LISTED = 5
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _register_config(path: Path) -> str:
    """Register a model config JSON with open_clip under its file stem and return that name."""
    if not path.is_file():
        raise ValueError(f"model config file not found: {path}")
    cfg = json.loads(path.read_text())
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        # open_clip's rescan skips such files silently; say why instead.
        raise ValueError(
            f"model config {path} lacks {missing}; an open_clip config needs {_CONFIG_KEYS}"
        )
    # Register only when needed: each add_model_config call grows open_clip's search path list.
    if open_clip.get_model_config(path.stem) != cfg:
        open_clip.add_model_config(path)
    return path.stem


def _unknown(what: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=_MAX_LISTED, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    return ValueError(f"unknown {what} {name!r}; {hint} (of {len(known)} known)")


def _check_name(name: str, pretrained: str | None) -> None:
    """Fail with close matches on an unknown architecture or pretrained tag, before any loading."""
    if name not in open_clip.list_models():
        raise _unknown("open_clip model", name, open_clip.list_models())
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise _unknown(f"pretrained tag (and not a file) for {name}:", pretrained, tags)


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _hf_filenames(filename: str) -> list[str]:
    """The files open_clip tries in a Hugging Face repo, safetensors first."""
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    filename = filename or HF_WEIGHTS_NAME
    return [*_get_safe_alternatives(filename), filename]


def cached_weights(name: str, tag: str) -> tuple[str | None, list[str]]:
    """(local file of open_clip's pretrained ``tag`` for ``name`` or None, the places looked at).

    Looks where open_clip would download to: the Hugging Face hub cache (HF_HUB_CACHE, or
    HF_HOME/hub) for tags hosted there, and ``~/.cache/clip`` for URL tags. Never goes online.
    """
    cfg = open_clip.get_pretrained_cfg(name, tag)
    looked: list[str] = []
    if cfg.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        for file in _hf_filenames(filename):
            path = try_to_load_from_cache(repo, file, cache_dir=constants.HF_HUB_CACHE)
            folder = f"models--{repo.replace('/', '--')}"
            looked.append(f"{constants.HF_HUB_CACHE}/{folder}/snapshots/*/{file}")
            if isinstance(path, str):
                return path, looked
    if cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        looked.append(str(path))
        if path.is_file():
            return str(path), looked
    return None, looked


def _offline_weights(name: str, tag: str) -> tuple[str, dict]:
    """(local checkpoint, create_model overrides) for a tag, or a ValueError saying how to get it.

    Passing the cached file itself keeps open_clip from asking the hub for updates (without
    internet that retries for about a minute); the tag's QuickGELU flag and preprocessing are
    passed on explicitly, as open_clip would take them from the tag.
    """
    path, looked = cached_weights(name, tag)
    if path is None:
        raise ValueError(
            f"pretrained weights {name}/{tag} are not on this machine (looked for {looked}) and "
            f'load_clip does not download: on a machine with internet run python -c "import '
            f"open_clip; open_clip.create_model('{name}', pretrained='{tag}')\" and copy the "
            "Hugging Face cache (HF_HOME or HF_HUB_CACHE; ~/.cache/clip for URL tags) here, set "
            "model.pretrained to a local checkpoint file, or call load_clip(..., download=True)"
        )
    cfg = open_clip.get_pretrained_cfg(name, tag)
    overrides = {
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
        "force_preprocess_cfg": {k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg},
    }
    return path, overrides


def load_clip(
    model: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    download: bool = False,
) -> tuple[open_clip.CLIP, Tokenizer]:
    """Build an open_clip CLIP and its tokenizer, in eval mode.

    Args:
        model: An open_clip architecture name (``"ViT-B-32"``) or the path of a model config
            JSON, which is registered with open_clip under its file stem.
        pretrained: None for random init (seed the global RNG first; open_clip's warning about
            it is dropped), a checkpoint file, or an open_clip tag such as ``"openai"`` (read
            from open_clip's local cache).
        device: Where the model lives.
        download: Let open_clip download a tag's weights that are not cached. Off by default:
            missing weights then fail at once, saying where they were looked for.

    Raises:
        ValueError: Unknown architecture or pretrained tag (close matches are listed), missing
            config file, or a tag's weights not cached (with how to get them).
    """
    is_config = model.endswith(".json") or Path(model).is_file()
    name = _register_config(Path(model)) if is_config else model
    overrides: dict = {}
    if ":" not in name:  # hf-hub: / local-dir: schemas are resolved by open_clip itself
        _check_name(name, pretrained)
        if pretrained is not None and not Path(pretrained).is_file():
            cfg = open_clip.get_pretrained_cfg(name, pretrained)
            overrides["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
            if not download:
                pretrained, overrides = _offline_weights(name, pretrained)
    with _random_init_expected() if pretrained is None else contextlib.nullcontext():
        clip = open_clip.create_model(name, pretrained=pretrained, device=device, **overrides)
    return clip.eval(), open_clip.get_tokenizer(name)


_RANDOM_INIT_WARNING = "No pretrained weights loaded for model"


def _not_random_init_warning(record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.WARNING and _RANDOM_INIT_WARNING in record.getMessage())


@contextlib.contextmanager
def _random_init_expected():
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning.

    ``pretrained=None`` asks for random init: training from scratch, or (every fine-tuning,
    head and merge stage) a model whose weights are loaded from our own files right after.
    open_clip logs through the root logger, so the filter sits there, for this call only; it
    sees root's own records, never those of named loggers (ours), and other warnings pass.
    """
    root = logging.getLogger()
    root.addFilter(_not_random_init_warning)
    try:
        yield
    finally:
        root.removeFilter(_not_random_init_warning)


def _float_state(module: torch.nn.Module) -> StateDict:
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in module.state_dict().items()
        if v.is_floating_point()
    }


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy ``state`` into the float entries of ``module``; keys and shapes must match exactly."""
    current = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"{what}: state does not match the model: {len(missing)} missing keys "
            f"{missing[:_MAX_LISTED]}, {len(unexpected)} unexpected keys {unexpected[:_MAX_LISTED]}"
        )
    for key, dst in current.items():
        if dst.shape != state[key].shape:
            raise ValueError(
                f"{what}: {key!r} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(dst.shape)}"
            )
    with torch.no_grad():  # state_dict() tensors share storage with the parameters
        for key, dst in current.items():
            dst.copy_(state[key])


def image_encoder_state(model: open_clip.CLIP) -> StateDict:
    """Float tensors of ``model.visual`` (keys relative to it), cloned to the CPU.

    Only the image tower is fine-tuned and merged, so task vectors are taken over these keys.
    """
    return _float_state(model.visual)


def load_image_encoder(model: open_clip.CLIP, state: Mapping[str, torch.Tensor]) -> None:
    """Load an image-encoder state into ``model.visual`` in place, strictly.

    Raises:
        ValueError: Keys differ (missing and unexpected ones are named) or a shape differs.
    """
    _load_strict(model.visual, state, "load_image_encoder")


def load_image_encoder_update(
    model: open_clip.CLIP, pretrained: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> None:
    """Load ``pretrained + delta`` into ``model.visual`` in place, one key at a time.

    The same values as ``load_image_encoder(model, vectors.apply(pretrained, delta))``, without
    ever building the merged state dict: a merge stage holds the update and the model, nothing
    more. Either map may be lazy (read from disk key by key); keys absent from ``delta`` get
    the pretrained value.

    Raises:
        ValueError: ``delta`` has keys the image tower lacks, ``pretrained`` lacks one of its
            keys, a shape differs, or a merged weight is NaN/Inf (each named).
    """
    current = {k: v for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    unexpected = sorted(set(delta) - set(current))
    missing = sorted(set(current) - set(pretrained))
    if unexpected or missing:
        raise ValueError(
            f"load_image_encoder_update: {len(unexpected)} update keys the image tower lacks "
            f"{unexpected[:_MAX_LISTED]}, {len(missing)} image-tower keys missing from the "
            f"pretrained state {missing[:_MAX_LISTED]}"
        )
    with torch.no_grad():  # state_dict() tensors share storage with the parameters
        for key, dst in current.items():
            base = pretrained[key]
            if base.shape != dst.shape:
                raise ValueError(
                    f"load_image_encoder_update: {key!r} has shape {tuple(base.shape)}, "
                    f"the model expects {tuple(dst.shape)}"
                )
            dst.copy_(base.float() + delta[key] if key in delta else base)
            check_finite(dst, key, "theta_0 + update")  # a diverged merge is not scored


def drop_text_tower(model: open_clip.CLIP) -> None:
    """Free everything but ``model.visual`` and the logit scale, in place: scoring with
    precomputed zero-shot heads only runs ``encode_image`` (ViT-B-32: 0.24 GB less)."""
    keep = {"visual", "logit_scale", "logit_bias"}
    for name in [n for n in model._modules if n not in keep]:
        setattr(model, name, None)
    for name in [n for n in model._parameters if n not in keep]:
        setattr(model, name, None)
    for name in list(model._buffers):
        model._buffers[name] = None


def full_state(model: open_clip.CLIP) -> StateDict:
    """Every float tensor of the whole CLIP, cloned to the CPU (the pretrained checkpoint)."""
    return _float_state(model)


def load_full_state(model: open_clip.CLIP, state: Mapping[str, torch.Tensor]) -> None:
    """Load a ``full_state`` into ``model`` in place, strictly.

    Raises:
        ValueError: Keys differ (missing and unexpected ones are named) or a shape differs.
    """
    _load_strict(model, state, "load_full_state")


def zeroshot_head(
    model: open_clip.CLIP,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    *,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Zero-shot classification head of shape (embed_dim, C), on the CPU.

    Each column is the normalized template-mean text embedding of one class, times
    ``exp(logit_scale)``, exactly as Task Arithmetic's heads, so ``logits`` needs no extra scale.

    Args:
        classnames: Class names in label order.
        templates: Format strings with one ``{}`` or callables taking the class name.
        device: Where ``model`` lives; the tokenized prompts are sent there.

    Raises:
        ValueError: No class names or no templates.
    """
    if not classnames or not templates:
        raise ValueError(
            f"zeroshot_head needs class names and templates, got {len(classnames)} class names "
            f"and {len(templates)} templates"
        )
    model.eval()
    head = open_clip.build_zero_shot_classifier(
        model, tokenizer, list(classnames), list(templates), device=device
    )
    with torch.no_grad():
        return (head * model.logit_scale.exp()).float().cpu().contiguous()


def normalize_images(model: open_clip.CLIP, images: torch.Tensor) -> torch.Tensor:
    """Map (N, 3, S, S) images in [0, 1] to the model's input: resized if S differs, then
    standardized with the model's mean and std (OpenAI's when the model carries none).
    """
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) != size:
        # open_clip's val transform resizes with bicubic; clamp its overshoot back into [0, 1].
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN), device=images.device)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD), device=images.device)
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def logits(model: open_clip.CLIP, head: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Class logits (N, C): L2-normalized image features of raw [0, 1] images times the head."""
    features = model.encode_image(normalize_images(model, images), normalize=True)  # (N, e)
    return features @ head
