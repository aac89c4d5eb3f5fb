"""The few places where transformers' API changed within the supported range, in one module.

- ``cache`` vs ``past_key_values``: transformers 5.24 renamed the cache argument of ``forward``/``generate`` and warns
  on the old name; :func:`cache_kwargs` names the one the installed version expects.
- layer types: :func:`layer_types_and_kwargs` reads them with transformers' own helper where it exists.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _cache_arg(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``: how ``model(...)``/``model.generate(...)`` take it."""
    return {_cache_arg(type(model).forward): cache}


def layer_types_and_kwargs(text_config) -> tuple[list[str], list[dict]]:
    """Each decoder layer's attention type (``full_attention``, ``sliding_attention``, ...) and its cache kwargs."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # older releases: infer from the config as DynamicCache did
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        types, kwargs = get_layer_types_and_kwargs(text_config)
        if isinstance(kwargs, dict):  # 5.14-5.18 return one dict for every layer
            kwargs = [dict(kwargs) for _ in types]
        return list(types), kwargs
    n = text_config.num_hidden_layers
    types = getattr(text_config, "layer_types", None)
    window = getattr(text_config, "sliding_window", None)
    if not types:
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    kwargs = [{"sliding_window": window} if t != "full_attention" else {} for t in types]
    return list(types), kwargs


def sliding_layer(kwargs: dict):
    """transformers' own dynamic sliding-window cache layer."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    return DynamicSlidingWindowLayer(**kwargs)


def decoder_kwarg(kwargs: dict, *names: str):
    """The first of ``names`` present in a decoder layer's kwargs (the cache argument changed name)."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None
