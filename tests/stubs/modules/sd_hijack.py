"""Fake of ``modules/sd_hijack.py``: ``model_hijack`` and the cross-attention optimisation switch.

The real hijack wraps the text encoder (textual inversion, 75-token chunking, emphasis) and
replaces ``CrossAttention.forward`` at class level with the chosen optimisation. The stub's tiny
model already chunks prompts itself, and ``apply_optimizations`` only records which optimisation
would be used (options from ``on_list_optimizers`` callbacks plus "None"); forwards are untouched.
"""
from __future__ import annotations

from modules import script_callbacks, sd_hijack_unet, shared

sd_hijack_unet.install()  # as the real module does at import: odd latent sizes work in the ldm UNet


class SdOptimization:
    name: str = None
    label: str | None = None
    cmd_opt: str | None = None
    priority: int = 0

    def title(self) -> str:
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def is_available(self) -> bool:
        return True

    def apply(self) -> None:
        pass

    def undo(self) -> None:
        pass


optimizers: list[SdOptimization] = []
current_optimizer: SdOptimization | None = None


def list_optimizers() -> None:
    new_optimizers = script_callbacks.list_optimizers_callback()
    optimizers.clear()
    optimizers.extend(sorted((x for x in new_optimizers if x.is_available()), key=lambda x: x.priority, reverse=True))


def apply_optimizations(option: str | None = None) -> str:
    """Pick an optimisation like the real selector and call its ``apply``; returns its name or "none"."""
    global current_optimizer
    undo_optimizations()
    if not optimizers:
        list_optimizers()
    selection = option or shared.opts.cross_attention_optimization
    if selection == "Automatic" and optimizers:
        chosen = next((x for x in optimizers if x.cmd_opt and getattr(shared.cmd_opts, x.cmd_opt, False)), optimizers[0])
    else:
        chosen = next((x for x in optimizers if x.title() == selection), None)
    current_optimizer = chosen
    if chosen is None:
        return "none"
    chosen.apply()
    return chosen.name


def undo_optimizations() -> None:
    global current_optimizer
    if current_optimizer is not None:
        current_optimizer.undo()
    current_optimizer = None


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method: str | None = None

    def __init__(self):
        self.extra_generation_params: dict = {}
        self.comments: list[str] = []
        self.embedding_db = None

    def apply_optimizations(self, option: str | None = None) -> None:
        self.optimization_method = apply_optimizations(option)

    def hijack(self, m) -> None:
        self.apply_optimizations()
        self.clip = getattr(m, "cond_stage_model", None)

    def undo_hijack(self, m) -> None:
        self.clip = None
        undo_optimizations()

    def apply_circular(self, enable: bool) -> None:
        self.circular_enabled = enable

    def clear_comments(self) -> None:
        self.comments = []
        self.extra_generation_params = {}

    def get_prompt_lengths(self, text: str) -> tuple[int, int]:
        tokens = len(text.split())
        return tokens, max(75, ((tokens + 74) // 75) * 75)

    def redo_hijack(self, m) -> None:
        self.undo_hijack(m)
        self.hijack(m)


model_hijack = StableDiffusionModelHijack()
