"""The few Gradio arguments that differ between the hosts' Gradio versions, in one place.

A1111 1.10 and Forge Classic run Gradio 3.41; Forge main runs Gradio 4.40. The components the panel and the
Train Adapter tab use exist in both; what changed on the way:

- ``gr.Image(source="upload")`` became ``sources=["upload"]`` (3.41 has no ``sources``, 4.x no ``source``).
- An event's JavaScript is ``_js=`` in 3.41 and ``js=`` in 4.x.
- A plot's ``width`` and ``tooltip`` are deprecated in 4.x (the plot fills its column and shows its own
  tooltip; the real Forge logs a warning for each).

Forge main patches every component to turn ``source`` into ``sources`` and to drop (with a warning) any
argument it does not know, but a bare Gradio 4 does not: passing each version its own
arguments works everywhere and warns nowhere.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


def image_source(source: str = "upload") -> dict[str, Any]:
    """The keyword that limits a ``gr.Image`` to one input source."""
    return {"sources": [source]} if GRADIO_4 else {"source": source}


def js(code: str | None) -> dict[str, Any]:
    """The keyword that runs ``code`` in the browser before an event's Python function."""
    if code is None:
        return {}
    return {"js": code} if GRADIO_4 else {"_js": code}


def plot_only_3(**arguments: Any) -> dict[str, Any]:
    """Plot arguments 3.41 reads and 4.x deprecates (``width``, ``tooltip``): given on 3.41 only."""
    return {} if GRADIO_4 else arguments
