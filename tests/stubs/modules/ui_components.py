"""Fake of ``modules/ui_components.py``: WebUI's small gradio 3.41 component subclasses.

Same classes and behaviour: ``Form*`` variants that sit inside gradio forms, ``ToolButton``,
``DropdownMulti``/``DropdownEditable`` and ``InputAccordion`` - a hidden ``gr.Checkbox`` (so its value
is a bool and it can be used as an input) that owns a ``gr.Accordion`` opened/closed with it;
``with InputAccordion(False, label=...) as acc:`` places children in the accordion. Like the real
one it registers a ``change`` listener, so build it inside ``gr.Blocks()``.
"""
from __future__ import annotations

import gradio as gr

if int(gr.__version__.split(".")[0]) >= 4:  # Gradio 4 writes a .pyi beside every component subclass; Forge's
    import gradio.component_meta  # modules/gradio_extensions.py turns that off, and so does this stand-in
    gradio.component_meta.create_or_modify_pyi = lambda *args, **kwargs: None


class FormComponent:
    def get_expected_parent(self):
        return gr.components.Form


gr.Dropdown.get_expected_parent = FormComponent.get_expected_parent  # the WebUI applies this patch too


class ToolButton(FormComponent, gr.Button):
    """Small button with a single emoji as text, fits inside gradio forms."""

    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"


class ResizeHandleRow(gr.Row):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.elem_classes.append("resize-handle-row")

    def get_block_name(self):
        return "row"


class FormRow(FormComponent, gr.Row):
    def get_block_name(self):
        return "row"


class FormColumn(FormComponent, gr.Column):
    def get_block_name(self):
        return "column"


class FormGroup(FormComponent, gr.Group):
    def get_block_name(self):
        return "group"


class FormHTML(FormComponent, gr.HTML):
    def get_block_name(self):
        return "html"


class FormColorPicker(FormComponent, gr.ColorPicker):
    def get_block_name(self):
        return "colorpicker"


class DropdownMulti(FormComponent, gr.Dropdown):
    """Always multiselect."""

    def __init__(self, **kwargs):
        super().__init__(multiselect=True, **kwargs)

    def get_block_name(self):
        return "dropdown"


class DropdownEditable(FormComponent, gr.Dropdown):
    """Allows custom values."""

    def __init__(self, **kwargs):
        super().__init__(allow_custom_value=True, **kwargs)

    def get_block_name(self):
        return "dropdown"


class InputAccordion(gr.Checkbox):
    """An accordion usable as an input: its value is True when open."""

    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        js_key = "js" if int(gr.__version__.split(".")[0]) >= 4 else "_js"  # Forge's copy, on Gradio 4, says js=
        self.change(fn=None, inputs=[self],
                    **{js_key: 'function(checked){ inputAccordionChecked("' + self.accordion_id + '", checked); }'})
        self.accordion = gr.Accordion(**{**kwargs, "elem_id": self.accordion_id, "label": kwargs.get("label", "Accordion"),
                                         "elem_classes": ["input-accordion"], "open": value})

    def extra(self):
        """A column in the accordion's label row: ``with acc.extra(): ...``."""
        return gr.Column(elem_id=self.accordion_id + "-extra", elem_classes="input-accordion-extra", min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"
