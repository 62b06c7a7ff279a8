"""One name per concept: the IP projection, the T2I kind and key layout, the FaceID variant each have one enum,
defined where the files and networks are known, and the training config speaks the same names (with the values
users type unchanged)."""
from __future__ import annotations

import pytest

from lib_adapters.errors import InputError
from lib_adapters.formats import detect
from lib_adapters.models import ip_adapter, t2i_adapter
from lib_adapters.training import config
from lib_adapters.training.cli_args import build_parser


def test_training_config_uses_the_model_and_format_enums():
    assert config.IPProjection is ip_adapter.IPProjection
    assert config.T2IKind is t2i_adapter.T2IKind
    assert config.T2ILayout is detect.T2ILayout


@pytest.mark.parametrize("field,values", [("projection", ("plain", "plus", "faceid")),
                                          ("adapter_kind", ("full", "light")),
                                          ("export_layout", ("tencentarc", "diffusers"))])
def test_the_values_users_type_are_unchanged(field, values):
    cls = config.IPAdapterConfig if field == "projection" else config.T2IConfig
    for value in values:
        assert getattr(cls(**{field: value}), field).value == value
        assert getattr(cls(**{field: value.upper()}), field).value == value


@pytest.mark.parametrize("field,value,allowed", [("projection", "full-face", "plain, plus, faceid"),
                                                 ("adapter_kind", "style", "full, light"),
                                                 ("export_layout", "ip-flat", "tencentarc, diffusers")])
def test_members_training_does_not_make_are_refused(field, value, allowed):
    cls = config.IPAdapterConfig if field == "projection" else config.T2IConfig
    with pytest.raises(InputError, match=f"{field} must be one of {allowed}; got '{value}'"):
        cls(**{field: value})
    if field == "projection":  # the member itself too, not only its string
        with pytest.raises(InputError, match="projection must be one of plain, plus, faceid"):
            config.IPAdapterConfig(projection=ip_adapter.IPProjection.FULL_FACE)


def test_the_command_line_offers_only_what_training_makes():
    actions = {a.dest: a for a in build_parser()._actions}
    assert actions["ip_projection"].choices == ["plain", "plus", "faceid"]
    assert actions["t2i_adapter_kind"].choices == ["full", "light"]
    assert actions["t2i_export_layout"].choices == ["tencentarc", "diffusers"]
