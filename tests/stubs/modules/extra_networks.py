"""Fake of ``modules/extra_networks.py``: ``<name:arg:...>`` prompt syntax and the network registry.

No networks are registered by default (the real WebUI registers hypernet and, via the builtin
extension, lora); tests may ``register_extra_network``. ``activate`` ends by calling the scripts'
``after_extra_networks_activate`` hook, as in v1.10.1.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict

from modules import errors

extra_network_registry: dict[str, "ExtraNetwork"] = {}
extra_network_aliases: dict[str, "ExtraNetwork"] = {}


def initialize() -> None:
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network: "ExtraNetwork") -> None:
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network: "ExtraNetwork", alias: str) -> None:
    extra_network_aliases[alias] = extra_network


def register_default_extra_networks() -> None:
    """The real one registers the hypernetwork handler; nothing here."""


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name: str):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def lookup_extra_networks(extra_network_data: dict) -> dict:
    res: dict = {}
    for name, args in list(extra_network_data.items()):
        network = extra_network_registry.get(name) or extra_network_aliases.get(name)
        if network is None:
            logging.info(f"Skipping unknown extra network: {name}")
            continue
        res.setdefault(network, []).extend(args)
    return res


def activate(p, extra_network_data: dict) -> None:
    activated = []
    for network, args in lookup_extra_networks(extra_network_data).items():
        try:
            network.activate(p, args)
            activated.append(network)
        except Exception as e:
            errors.display(e, f"activating extra network {network.name} with arguments {args}")
    for name, network in extra_network_registry.items():
        if network in activated:
            continue
        try:
            network.activate(p, [])
        except Exception as e:
            errors.display(e, f"activating extra network {name}")
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds,
                                                subseeds=p.subseeds, extra_network_data=extra_network_data)


def deactivate(p, extra_network_data: dict) -> None:
    data = lookup_extra_networks(extra_network_data)
    for network in data:
        try:
            network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {network.name}")
    for name, network in extra_network_registry.items():
        if network in data:
            continue
        try:
            network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating unmentioned extra network {name}")


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt: str) -> tuple[str, dict]:
    res: dict = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts: list[str]) -> tuple[list[str], dict]:
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data
