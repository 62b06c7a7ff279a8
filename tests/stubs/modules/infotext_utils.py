"""Fake of ``modules/infotext_utils.py`` (old name ``generation_parameters_copypaste``).

``quote``/``unquote``/``parse_generation_parameters`` follow v1.10.1: the last line is parsed as
``Key: value`` pairs with the real regex (values with ``,``, ``:`` or newlines are JSON-quoted by
``quote``), ``WxH`` values split into ``Key-1``/``Key-2``, and the same defaults are filled in.
Left out: style extraction, the ``Emphasis`` guess, old hires-fix and version back-compat rewrites.
Paste-field registration keeps its data structures but wires nothing into a UI.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable

from modules import shared

sys.modules["modules.generation_parameters_copypaste"] = sys.modules[__name__]  # alias for the old name

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


class ParamBinding:
    def __init__(self, paste_button, tabname, source_text_component=None, source_image_component=None,
                 source_tabname=None, override_settings_component=None, paste_field_names=None):
        self.paste_button = paste_button
        self.tabname = tabname
        self.source_text_component = source_text_component
        self.source_image_component = source_image_component
        self.source_tabname = source_tabname
        self.override_settings_component = override_settings_component
        self.paste_field_names = paste_field_names or []


class PasteField(tuple):
    """``(component, target)`` where target is an infotext label or ``fn(params) -> value``."""

    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


paste_fields: dict[str, dict] = {}
registered_param_bindings: list[ParamBinding] = []


def reset() -> None:
    paste_fields.clear()
    registered_param_bindings.clear()


def quote(text: Any) -> Any:
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def add_paste_fields(tabname: str, init_img, fields, override_settings_component=None) -> None:
    if fields:
        for i in range(len(fields)):
            if not isinstance(fields[i], PasteField):
                fields[i] = PasteField(*fields[i])
    paste_fields[tabname] = {"init_img": init_img, "fields": fields, "override_settings_component": override_settings_component}


def register_paste_params_button(binding: ParamBinding) -> None:
    registered_param_bindings.append(binding)


def connect_paste_params_buttons() -> None:
    """No UI to connect in the stub."""


_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint", "Hires prompt": "",
    "Hires negative prompt": "", "Mask mode": "Inpaint masked", "Masked content": "original",
    "Inpaint area": "Whole picture", "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic",
    "Schedule max sigma": 0, "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full",
    "VAE Decoder": "Full", "FP8 weight": "Disable", "Refiner switch by sampling steps": False,
}


def parse_generation_parameters(x: str, skip_fields: list[str] | None = None) -> dict[str, Any]:
    """Parse an infotext (prompt lines, ``Negative prompt:`` lines, last line of params) into a dict."""
    if skip_fields is None:
        skip_fields = shared.opts.infotext_skip_pasting
    res: dict[str, Any] = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = re_imagesize.match(v) if isinstance(v, str) else None
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for key, value in _DEFAULTS.items():
        res.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    for key in skip_fields:
        res.pop(key, None)
    return res


infotext_to_setting_name_mapping: list[tuple[str, str]] = [
    ("Clip skip", "CLIP_stop_at_last_layers"), ("ENSD", "eta_noise_seed_delta"), ("RNG", "randn_source"),
    ("NGMS", "s_min_uncond"), ("Pad conds", "pad_cond_uncond"), ("VAE Encoder", "sd_vae_encode_method"),
    ("VAE Decoder", "sd_vae_decode_method"), ("Skip Early CFG", "skip_early_cond"),
]


def create_override_settings_dict(text_pairs: list[str]) -> dict[str, Any]:
    """``["Clip skip: 2", ...]`` -> ``{"CLIP_stop_at_last_layers": 2}`` using the mapping above."""
    res: dict[str, Any] = {}
    params = {}
    for pair in text_pairs:
        k, v = pair.split(":", maxsplit=1)
        params[k] = v.strip()
    for param_name, setting_name in infotext_to_setting_name_mapping:
        value = params.get(param_name)
        if value is not None:
            res[setting_name] = shared.opts.cast_value(setting_name, value)
    return res


def get_override_settings(params: dict[str, Any], *, skip_fields: list[str] | None = None) -> list[tuple[str, str, Any]]:
    res = []
    for param_name, setting_name in infotext_to_setting_name_mapping:
        if param_name in (skip_fields or []) or param_name not in params:
            continue
        value = shared.opts.cast_value(setting_name, params[param_name])
        if value != getattr(shared.opts, setting_name, None):
            res.append((param_name, setting_name, value))
    return res


def connect_paste(button, paste_fields_list, input_comp, override_settings_component, tabname) -> Callable:
    """No UI to connect in the stub."""
    return lambda *args: None
