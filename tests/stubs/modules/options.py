"""Fake of ``modules/options.py``: ``OptionInfo``, ``options_section`` and the ``Options`` store.

Behaviour kept from v1.10.1: attribute reads fall back from ``data`` to the registered default;
attribute writes to known keys go to ``data``; ``set`` compares, writes, runs ``onchange`` (and
restores the old value if it raises); ``add_option`` registers a label and seeds ``data``.
``--freeze-settings*`` checks are reduced to ``freeze_settings``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from modules import errors
from modules.shared_cmd_options import cmd_opts


class OptionInfo:
    """One setting: default, label, UI component and where it is shown."""

    def __init__(self, default: Any = None, label: str = "", component: Any = None, component_args: Any = None,
                 onchange: Callable[[], None] | None = None, section: tuple | None = None,
                 refresh: Callable[[], None] | None = None, comment_before: str = "", comment_after: str = "",
                 infotext: str | None = None, restrict_api: bool = False, category_id: str | None = None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label: str, url: str) -> "OptionInfo":
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label: str, js_func: str) -> "OptionInfo":
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info: str) -> "OptionInfo":
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html: str) -> "OptionInfo":
        self.comment_after += html
        return self

    def needs_restart(self) -> "OptionInfo":
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self) -> "OptionInfo":
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


class OptionHTML(OptionInfo):
    """A settings-page text block; never saved."""

    def __init__(self, text: str):
        super().__init__(str(text).strip(), label="")
        self.do_not_save = True


def options_section(section_identifier: tuple, options_dict: dict[str, OptionInfo]) -> dict[str, OptionInfo]:
    """Assign ``(id, title)`` or ``(id, title, category)`` to every option of the dict; returns the dict."""
    for info in options_dict.values():
        if len(section_identifier) == 2:
            info.section = section_identifier
        elif len(section_identifier) == 3:
            info.section = section_identifier[0:2]
            info.category_id = section_identifier[2]
    return options_dict


options_builtin_fields = {"data_labels", "data", "restricted_opts", "typemap"}


class Options:
    """``shared.opts``: values in ``data``, definitions in ``data_labels``."""

    typemap = {int: float}

    def __init__(self, data_labels: dict[str, OptionInfo], restricted_opts: set[str]):
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in data_labels.items() if not v.do_not_save}
        self.restricted_opts = restricted_opts

    def __setattr__(self, key: str, value: Any) -> None:
        if key in options_builtin_fields:
            return super().__setattr__(key, value)
        if self.data is not None and (key in self.data or key in self.data_labels):
            assert not cmd_opts.freeze_settings, "changing settings is disabled"
            info = self.data_labels.get(key)
            if info is not None and info.do_not_save:
                return
            args = info.component_args if info else None
            if isinstance(args, dict) and args.get("visible", True) is False:
                raise RuntimeError(f"not possible to set '{key}' because it is restricted")
            self.data[key] = value
            return
        return super().__setattr__(key, value)

    def __getattr__(self, item: str) -> Any:
        if item in options_builtin_fields:
            return super().__getattribute__(item)
        if self.data is not None and item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return super().__getattribute__(item)

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        """Set an option and run its ``onchange``; True if the value changed."""
        old = self.data.get(key, None)
        if old == value:
            return False
        option = self.data_labels[key]
        if option.do_not_save or (is_api and option.restrict_api):
            return False
        try:
            setattr(self, key, value)
        except RuntimeError:
            return False
        if run_callbacks and option.onchange is not None:
            try:
                option.onchange()
            except Exception as e:
                errors.display(e, f"changing setting {key} to {value}")
                setattr(self, key, old)
                return False
        return True

    def get_default(self, key: str) -> Any:
        info = self.data_labels.get(key)
        return None if info is None else info.default

    def save(self, filename: str) -> None:
        assert not cmd_opts.freeze_settings, "saving settings is disabled"
        with open(filename, "w", encoding="utf8") as file:
            json.dump(self.data, file, indent=4, ensure_ascii=False)

    def load(self, filename: str) -> None:
        try:
            with open(filename, "r", encoding="utf8") as file:
                self.data = json.load(file)
        except FileNotFoundError:
            self.data = {}

    def same_type(self, x: Any, y: Any) -> bool:
        if x is None or y is None:
            return True
        return self.typemap.get(type(x), type(x)) == self.typemap.get(type(y), type(y))

    def onchange(self, key: str, func: Callable[[], None], call: bool = True) -> None:
        self.data_labels.get(key).onchange = func
        if call:
            func()

    def dumpjson(self) -> str:
        return json.dumps({k: self.data.get(k, v.default) for k, v in self.data_labels.items()})

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def reorder(self) -> None:
        """The real one sorts by category and section; order is irrelevant to tests."""

    def cast_value(self, key: str, value: Any) -> Any:
        if value is None:
            return None
        default = self.data_labels[key].default
        if default is None:
            default = getattr(self, key, None)
        if default is None:
            return None
        expected = type(default)
        if expected == bool and value == "False":
            return False
        return expected(value)


@dataclass
class OptionsCategory:
    id: str
    label: str


class OptionsCategories:
    def __init__(self):
        self.mapping: dict[str, OptionsCategory] = {}

    def register_category(self, category_id: str, label: str) -> str:
        if category_id not in self.mapping:
            self.mapping[category_id] = OptionsCategory(category_id, label)
        return category_id


categories = OptionsCategories()
