"""Fake of ``modules/prompt_parser.py``: prompts -> (multi)conditioning and back per step.

Kept: ``AND`` composition with optional ``:weight`` per sub-prompt, per-step reconstruction into
the stacked tensor the CFG denoiser consumes (``conds_list`` = per image, ``(row, weight)`` pairs),
``DictWithShape`` for SDXL dict conds, padding of different token lengths by repeating the last
token row. Left out: prompt editing ``[from:to:when]`` and alternation schedules (every prompt
has one schedule ending at the last step) and attention ``(word:1.2)`` parsing.
"""
from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class SdConditioning(list):
    """A list of prompts with the image size and polarity the model may want (SDXL size embeddings)."""

    def __init__(self, prompts, is_negative_prompt: bool = False, width: int | None = None,
                 height: int | None = None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        copy_from = copy_from if copy_from is not None else prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules: list[ScheduledPromptConditioning], weight: float = 1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape: tuple, batch: list[list[ComposableScheduledPromptConditioning]]):
        self.shape = shape
        self.batch = batch


class DictWithShape(dict):
    """SDXL conds: ``{"crossattn": ..., "vector": ...}`` with ``.shape`` of the crossattn tensor."""

    def __init__(self, x: dict, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_prompt_list(prompts) -> tuple[list[list[tuple[int, float]]], SdConditioning, dict[str, int]]:
    res_indexes, prompt_indexes = [], {}
    prompt_flat_list = SdConditioning([], copy_from=prompts)
    for prompt in prompts:
        indexes = []
        for subprompt in re_AND.split(prompt):
            match = re_weight.search(subprompt)
            text, weight = match.groups() if match is not None else (subprompt, 1.0)
            weight = float(weight) if weight is not None else 1.0
            index = prompt_indexes.get(text)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


def get_learned_conditioning(model, prompts, steps: int, hires_steps: int | None = None,
                             use_old_scheduling: bool = False) -> list[list[ScheduledPromptConditioning]]:
    """One schedule per prompt (identical prompts share the encoder call)."""
    unique = list(dict.fromkeys(prompts))
    conds = model.get_learned_conditioning(SdConditioning(unique, copy_from=prompts))
    by_text = {}
    for i, text in enumerate(unique):
        cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
        by_text[text] = [ScheduledPromptConditioning(steps, cond)]
    return [by_text[text] for text in prompts]


def get_multicond_learned_conditioning(model, prompts, steps: int, hires_steps: int | None = None,
                                       use_old_scheduling: bool = False) -> MulticondLearnedConditioning:
    res_indexes, prompt_flat_list, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, prompt_flat_list, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _at_step(schedules: list[ScheduledPromptConditioning], current_step: int):
    for schedule in schedules:
        if current_step <= schedule.end_at_step:
            return schedule.cond
    return schedules[-1].cond


def stack_conds(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack rows; shorter token sequences are padded by repeating their last token row."""
    token_count = max(x.shape[0] for x in tensors)
    padded = [x if x.shape[0] == token_count else torch.vstack([x, x[-1:].repeat([token_count - x.shape[0], 1])])
              for x in tensors]
    return torch.stack(padded)


def _stack(conds: list):
    if isinstance(conds[0], dict):
        stacked = {k: (stack_conds([x[k] for x in conds]) if conds[0][k].dim() == 2 else torch.stack([x[k] for x in conds]))
                   for k in conds[0].keys()}
        return DictWithShape(stacked)
    return stack_conds(conds)


def reconstruct_cond_batch(c: list[list[ScheduledPromptConditioning]], current_step: int):
    return _stack([_at_step(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step: int):
    """Returns ``(conds_list, stacked)``: for image i, ``conds_list[i]`` lists ``(row in stacked, weight)``."""
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable in composable_prompts:
            conds_for_batch.append((len(tensors), composable.weight))
            tensors.append(_at_step(composable.schedules, current_step))
        conds_list.append(conds_for_batch)
    return conds_list, _stack(tensors)
