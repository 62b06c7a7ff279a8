"""``modules_forge.unet_patcher.UnetPatcher``: the stub's Classic-flavoured patcher."""
from stubs_forge.patcher import ClassicUnetPatcher as UnetPatcher  # noqa: F401
