"""Fake of the WebUI's ``modules.generation_parameters_copypaste``: the old name of ``infotext_utils``.

The real WebUI creates this alias with ``sys.modules[...] = infotext_utils`` when ``infotext_utils``
is imported; this file makes ``import modules.generation_parameters_copypaste`` work even first.
"""
from __future__ import annotations

import sys

from modules import infotext_utils

sys.modules[__name__] = infotext_utils
