"""The FaceID options of a unit in the Adapters accordion (a FaceID model reads these; other models ignore them).

Kept apart from ``script.py`` so the script only places them: the components, keyed by the unit fields they
set (``AdapterUnit``), join the unit's other fields.
"""
from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from ...face import available_packs
from ...inference.units import AdapterUnit


def faceid_options(eid: Callable[[str], str], default: AdapterUnit, models_dir: Any) -> dict[str, Any]:
    with gr.Accordion("IP-Adapter FaceID options", open=False):
        with gr.Row():
            face_index = gr.Slider(label="Face (-1: the largest; 0, 1, ...: counted from the left)", minimum=-1,
                                   maximum=9, step=1, value=default.face_index, elem_id=eid("face_index"))
            face_pack = gr.Dropdown(label="Face models (empty: the one in Settings)", value=default.face_pack,
                                    choices=[""] + available_packs(models_dir), allow_custom_value=True,
                                    elem_id=eid("face_pack"))
        with gr.Row():
            faceid_lora = gr.Checkbox(label="Apply the model's LoRA", value=default.faceid_lora,
                                      elem_id=eid("faceid_lora"))
            faceid_lora_weight = gr.Slider(label="LoRA weight", minimum=0.0, maximum=2.0, step=0.05,
                                           value=default.faceid_lora_weight, elem_id=eid("faceid_lora_weight"))
            s_scale = gr.Slider(label="Structure weight (FaceID Plus v2)", minimum=0.0, maximum=3.0, step=0.05,
                                value=default.s_scale, elem_id=eid("s_scale"))
    return dict(face_index=face_index, face_pack=face_pack, faceid_lora=faceid_lora,
                faceid_lora_weight=faceid_lora_weight, s_scale=s_scale)
