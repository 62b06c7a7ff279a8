"""Fake of the built-in Lora extension's ``networks`` module (``extensions-builtin/Lora/networks.py`` at 82a973c0,
plus the registrations of ``scripts/lora_script.py`` and ``extra_networks_lora.py``), LoRA modules only.

What is kept as in the original: the module-level state (``available_networks``, ``available_network_aliases``,
``loaded_networks``, ``networks_in_memory``, ``forbidden_network_aliases``), ``list_available_networks()`` scanning
``cmd_opts.lora_dir`` and ``cmd_opts.lyco_dir_backcompat``, ``load_networks(names, te, unet, dyn)`` (reload when
the file is newer), names assigned to layers on model load (``network_layer_name``), and the default weight-merging
mode: the patched ``Linear``/``Conv2d``/``MultiheadAttention`` forwards call ``network_apply_weights``, which backs
up a layer's weights once, restores them when the wanted set of networks changes, and merges ``up @ down *
alpha/rank * multiplier`` in place. So a LoRA stays merged in the weights after a generation until a prompt
without it runs (``activate(p, [])`` -> ``load_networks([])``), exactly the state a trainer must not bake in.
Key matching and the merge itself come from ``tests/training/webui_lora.py`` (the faithful mapping).

Only the real module's top-level import makes it importable as ``networks`` (the WebUI puts the extension's
folder on ``sys.path``); tests add this folder and call :func:`install` / :func:`uninstall`.
"""
from __future__ import annotations

import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modules import extra_networks, script_callbacks, shared
from webui_lora import accepts_lora, match_keys, merged_delta, network_layer_mapping

log = logging.getLogger(__name__)


class NetworkOnDisk:
    def __init__(self, name: str, filename: str):
        self.name = name
        self.filename = filename
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.metadata = {}
        if self.is_safetensors:
            with safe_open(filename, framework="pt") as f:
                self.metadata = dict(f.metadata() or {})
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = self.metadata.get("sshs_model_hash") or ""
        self.shorthash = self.hash[:12]
        if self.shorthash:
            available_network_hash_lookup[self.shorthash] = self

    def read_hash(self) -> None:
        """The real one hashes the file when the metadata has no hash; the stub keeps what it has."""

    def get_alias(self) -> str:
        if shared.opts.data.get("lora_preferred_name") == "Filename" or self.alias.lower() in forbidden_network_aliases:
            return self.name
        return self.alias


class NetworkModule:
    """One layer's LoRA weights (``network_lora.NetworkModuleLora``)."""

    def __init__(self, net: "Network", entry):
        self.network = net
        self.entry = entry
        self.sd_key = entry.sd_key

    def multiplier(self) -> float:
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

    def calc_updown(self, weight: torch.Tensor) -> torch.Tensor:
        return merged_delta(self.entry, self.multiplier()).to(weight.device, weight.dtype)


class Network:
    def __init__(self, name: str, network_on_disk: NetworkOnDisk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules: dict[str, NetworkModule] = {}
        self.bundle_embeddings: dict = {}
        self.mtime = None
        self.mentioned_name = None
        self.unmatched: dict[str, str] = {}


def assign_network_names_to_compvis_modules(sd_model) -> None:
    mapping = network_layer_mapping(sd_model)
    for name, module in mapping.items():
        module.network_layer_name = name
    sd_model.network_layer_mapping = mapping


def load_network(name: str, network_on_disk: NetworkOnDisk) -> Network:
    net = Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    state_dict = load_file(network_on_disk.filename)
    matched, failed = match_keys(state_dict, shared.sd_model)
    for key, entry in matched.items():
        if not accepts_lora(entry):
            failed.update({f"{key}.{part}": key for part in entry.weights})
            continue
        net.modules[key] = NetworkModule(net, entry)
    net.unmatched = failed
    if failed:
        log.debug("Network %s didn't match keys: %s", network_on_disk.filename, failed)
    return net


def purge_networks_from_memory() -> None:
    limit = int(shared.opts.data.get("lora_in_memory_limit", 0))
    while len(networks_in_memory) > limit and len(networks_in_memory) > 0:
        networks_in_memory.pop(next(iter(networks_in_memory)), None)


def _on_disk(name: str):
    if name.lower() in forbidden_network_aliases:
        return available_networks.get(name)
    return available_network_aliases.get(name)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()
    unavailable = [n for n in names if _on_disk(n) is None]
    if unavailable:
        process_network_files(unavailable)
    on_disk = [_on_disk(n) for n in names]
    if any(x is None for x in on_disk):
        list_available_networks()
        on_disk = [_on_disk(n) for n in names]
    failed = []
    for i, (network_on_disk, name) in enumerate(zip(on_disk, names)):
        net = already_loaded.get(name)
        if network_on_disk is not None:
            if net is None:
                net = networks_in_memory.get(name)
            if net is None or os.path.getmtime(network_on_disk.filename) > net.mtime:
                net = load_network(name, network_on_disk)
                networks_in_memory.pop(name, None)
                networks_in_memory[name] = net
            net.mentioned_name = name
        if net is None:
            failed.append(name)
            continue
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)
    if failed:
        not_found.append(failed)
    purge_networks_from_memory()


def store_weights_backup(weight):
    return None if weight is None else weight.to("cpu", copy=True)


def restore_weights_backup(obj, field: str, weight) -> None:
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self) -> None:
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        if isinstance(self, torch.nn.MultiheadAttention):
            restore_weights_backup(self, "in_proj_weight", weights_backup[0])
            restore_weights_backup(self.out_proj, "weight", weights_backup[1])
        else:
            restore_weights_backup(self, "weight", weights_backup)
    if isinstance(self, torch.nn.MultiheadAttention):
        restore_weights_backup(self.out_proj, "bias", bias_backup)
    else:
        restore_weights_backup(self, "bias", bias_backup)


def network_apply_weights(self) -> None:
    """Merge the currently loaded networks into this layer's weights (restoring the backup first when the wanted
    set differs from what is merged). As in the original, the copies are not under ``no_grad``: the base weights
    must not require grad when this runs."""
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)

    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != ():
            raise RuntimeError(f"{network_layer_name} - no backup weights found and current weights are not unchanged")
        if isinstance(self, torch.nn.MultiheadAttention):
            weights_backup = (store_weights_backup(self.in_proj_weight), store_weights_backup(self.out_proj.weight))
        else:
            weights_backup = store_weights_backup(self.weight)
        self.network_weights_backup = weights_backup

    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        if isinstance(self, torch.nn.MultiheadAttention) and self.out_proj.bias is not None:
            bias_backup = store_weights_backup(self.out_proj.bias)
        elif getattr(self, "bias", None) is not None:
            bias_backup = store_weights_backup(self.bias)
        self.network_bias_backup = bias_backup

    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(network_layer_name)
            if module is not None and hasattr(self, "weight"):
                with torch.no_grad():
                    updown = module.calc_updown(self.weight).float()
                    self.weight.copy_((self.weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
        self.network_current_names = wanted_names


def network_reset_cached_weight(self) -> None:
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


class LoraPatches:
    """``lora_patches.LoraPatches``: the torch layer forwards (and load_state_dict) replaced globally."""

    def __init__(self):
        self.Linear_forward = torch.nn.Linear.forward
        self.Conv2d_forward = torch.nn.Conv2d.forward
        self.MultiheadAttention_forward = torch.nn.MultiheadAttention.forward
        self.Linear_load_state_dict = torch.nn.Linear._load_from_state_dict
        self.Conv2d_load_state_dict = torch.nn.Conv2d._load_from_state_dict
        torch.nn.Linear.forward = network_Linear_forward
        torch.nn.Conv2d.forward = network_Conv2d_forward
        torch.nn.MultiheadAttention.forward = network_MultiheadAttention_forward
        torch.nn.Linear._load_from_state_dict = network_Linear_load_state_dict
        torch.nn.Conv2d._load_from_state_dict = network_Conv2d_load_state_dict

    def undo(self) -> None:
        torch.nn.Linear.forward = self.Linear_forward
        torch.nn.Conv2d.forward = self.Conv2d_forward
        torch.nn.MultiheadAttention.forward = self.MultiheadAttention_forward
        torch.nn.Linear._load_from_state_dict = self.Linear_load_state_dict
        torch.nn.Conv2d._load_from_state_dict = self.Conv2d_load_state_dict


def network_Linear_forward(self, input):  # noqa: N802 (real name)
    network_apply_weights(self)
    return originals.Linear_forward(self, input)


def network_Conv2d_forward(self, input):  # noqa: N802
    network_apply_weights(self)
    return originals.Conv2d_forward(self, input)


def network_MultiheadAttention_forward(self, *args, **kwargs):  # noqa: N802
    network_apply_weights(self)
    return originals.MultiheadAttention_forward(self, *args, **kwargs)


def network_Linear_load_state_dict(self, *args, **kwargs):  # noqa: N802
    network_reset_cached_weight(self)
    return originals.Linear_load_state_dict(self, *args, **kwargs)


def network_Conv2d_load_state_dict(self, *args, **kwargs):  # noqa: N802
    network_reset_cached_weight(self)
    return originals.Conv2d_load_state_dict(self, *args, **kwargs)


def _walk(folder: str | None):
    if not folder or not os.path.isdir(folder):
        return
    for root, _dirs, files in os.walk(folder, followlinks=True):
        for filename in sorted(files):
            if os.path.splitext(filename)[1].lower() in (".pt", ".ckpt", ".safetensors"):
                yield os.path.join(root, filename)


def process_network_files(names: list[str] | None = None) -> None:
    candidates = list(_walk(shared.cmd_opts.lora_dir)) + list(_walk(shared.cmd_opts.lyco_dir_backcompat))
    for filename in candidates:
        name = os.path.splitext(os.path.basename(filename))[0]
        if names and name not in names:
            continue
        entry = NetworkOnDisk(name, filename)
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def list_available_networks() -> None:
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    process_network_files()


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    """``extra_networks_lora.ExtraNetworkLora`` (``<lora:name:te:unet>``), without the infotext hashes."""

    def __init__(self):
        super().__init__("lora")
        self.errors: dict = {}

    def activate(self, p, params_list) -> None:
        names, te, unet = [], [], []
        for params in params_list:
            names.append(params.positional[0])
            te_multiplier = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te_multiplier = float(params.named.get("te", te_multiplier))
            unet_multiplier = float(params.positional[2]) if len(params.positional) > 2 else te_multiplier
            te.append(te_multiplier)
            unet.append(float(params.named.get("unet", unet_multiplier)))
        load_networks(names, te, unet, [None] * len(names))

    def deactivate(self, p) -> None:
        self.errors.clear()


originals: LoraPatches | None = None
extra_network_lora: ExtraNetworkLora | None = None
available_networks: dict[str, NetworkOnDisk] = {}
available_network_aliases: dict[str, NetworkOnDisk] = {}
loaded_networks: list[Network] = []
networks_in_memory: dict[str, Network] = {}
available_network_hash_lookup: dict[str, NetworkOnDisk] = {}
forbidden_network_aliases: dict[str, int] = {}
not_found: list[list[str]] = []
"""Names a prompt asked for that were not in the Lora dir (the real one appends "Lora not found" comments)."""


def install() -> None:
    """What loading the extension does: patches, the model-loaded callback, the extra network, the list."""
    global originals, extra_network_lora
    originals = LoraPatches()
    script_callbacks.on_model_loaded(assign_network_names_to_compvis_modules)
    extra_network_lora = ExtraNetworkLora()
    extra_networks.register_extra_network(extra_network_lora)
    extra_networks.register_extra_network_alias(extra_network_lora, "lyco")
    list_available_networks()
    if shared.sd_model is not None:
        assign_network_names_to_compvis_modules(shared.sd_model)


def uninstall() -> None:
    """``lora_script.unload``: undo the patches; the module state is cleared for the next test."""
    global originals, extra_network_lora
    if originals is not None:
        originals.undo()
    originals = None
    extra_networks.extra_network_registry.pop("lora", None)
    extra_networks.extra_network_aliases.pop("lyco", None)
    extra_network_lora = None
    for container in (available_networks, available_network_aliases, networks_in_memory,
                      available_network_hash_lookup, forbidden_network_aliases):
        container.clear()
    loaded_networks.clear()
    not_found.clear()
