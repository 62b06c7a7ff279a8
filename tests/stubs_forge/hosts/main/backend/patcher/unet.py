"""``backend.patcher.unet.UnetPatcher``: the stub's main-flavoured patcher."""
from stubs_forge.patcher import UnetPatcher  # noqa: F401
