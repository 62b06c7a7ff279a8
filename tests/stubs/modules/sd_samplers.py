"""Fake of ``modules/sd_samplers.py``: sampler registry and ``create_sampler``.

Only "Euler" exists; any other name (e.g. the UI default "DPM++ 2M") is accepted and runs Euler
with the requested name kept on ``p`` and in the infotext, so scripts see what the user chose.
"""
from __future__ import annotations

from modules import sd_samplers_common, sd_samplers_kdiffusion
from modules.sd_samplers_common import sample_to_image, samples_to_image_grid  # noqa: F401

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion]
all_samplers_map = {x.name: x for x in all_samplers}
samplers: list = all_samplers
samplers_for_img2img: list = all_samplers
samplers_map: dict[str, str] = {}
for _sampler in all_samplers:
    samplers_map[_sampler.name.lower()] = _sampler.name
    for _alias in _sampler.aliases:
        samplers_map[_alias.lower()] = _sampler.name


def find_sampler_config(name: str | None) -> sd_samplers_common.SamplerData:
    return all_samplers_map.get(name) or all_samplers[0]


def create_sampler(name: str | None, model) -> sd_samplers_common.Sampler:
    config = find_sampler_config(name)
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def set_samplers() -> None:
    """Sampler visibility settings are not modelled."""


def visible_sampler_names() -> list[str]:
    return [x.name for x in samplers]


def fix_p_invalid_sampler_and_scheduler(p) -> None:
    """The real one maps unknown names to defaults; the stub keeps the name (every name runs Euler)."""
    if p.sampler_name is None:
        p.sampler_name = "Euler"
