"""A fake of what Stable Diffusion WebUI Forge adds to the WebUI, for the Forge host tests.

Written from the signatures and semantics in /work/shared/research/forge-host-api.md (Forge main
``lllyasviel/stable-diffusion-webui-forge`` at dfdcbab685e57677014f05a3309b48cc87383167, Forge Classic
``Haoming02/sd-webui-forge-classic`` at 1f95d7170189cf93952aca122c1ee2f306a07e4c); both are AGPL-3.0, so
nothing here is their code. It sits on top of the A1111 stub (``tests/stubs``), which stays as it is:
``webui.install(flavour)`` switches a running stub WebUI to Forge's behaviour and ``uninstall`` switches it
back.

- ``patcher``: ``ModelPatcher``/``UnetPatcher`` (clone with deep-copied ``model_options``, the patch and
  replace setters, block modifiers, ControlNet linked list, weight patches: main's keyword-only
  ``add_patches(filename=...)`` merged by a shared ``LoraLoader`` when a patcher is loaded, Classic's
  positional ``add_patches`` merged by ``patch_model`` and taken back by ``unpatch_model``) and the
  loader that loads one patcher per model (``memory``).
- ``unet``: the UNet forward in Forge's order over the genuine ldm modules of the tiny model (the very
  modules the A1111 tests run), with every patch point: block modifiers, ``apply_control``, block inner
  modifiers, input/output block patches, and per transformer block attn1/attn2 patches, replace slots and
  output patches.
- ``sampling``: the k-model wrapper (``apply_model``) and the sampling function: cond and uncond batched
  uncond first with ``cond_or_uncond``/``cond_mark``/``sigmas``, chunks split when the stub's memory limit
  says so, cfg 1 skipping the uncond, ControlNet ``get_control``, ``sampling_prepare``/``cleanup``.
- ``webui``: Forge's lifecycle in the stub WebUI (``forge_objects`` reset before every pass,
  ``process_before_every_sampling`` twice in main's hires pass, the CFG denoiser calling the sampling
  function with one row per image, main's engine without ``.model``, Classic's step-0 skip).
- ``builtins``: stand-ins for Forge's own IP-Adapter (an attn2 *replace* patch) and ControlNet (control
  residuals), to check that ours chains with them.
- ``hosts/main`` and ``hosts/classic``: the packages whose presence tells the hosts apart
  (``modules_forge``, ``backend``, ``ldm_patched``); ``install`` puts one on ``sys.path``.

Not modelled: model loading and memory estimates, devices, dtypes other than the tiny model's fp32, AND
prompts and area conditioning, refiner, inpainting's noisy-latent blend before denoising, Forge's UI.
Both flavours walk each UNet block's layers as functions (Classic's ``forward_timestep_embed``); on main
the real UNet calls the block module, which only matters to instance forward wrappers, never used here.
"""
