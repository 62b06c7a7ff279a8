"""WebUI entry point for training: the "Train Adapter" tab (``on_ui_tabs``), the training web API
(``on_app_started``; only when the WebUI runs with ``--api`` or ``--nowebui``) and stopping a run when the
scripts are unloaded (a UI reload).

One ``TrainingJobs`` per process, shared by the tab and the API, created on first use: importing
this file only registers callbacks.
"""
from modules import script_callbacks

from lib_adapters.webui.training import api as training_api
from lib_adapters.webui.training.forge_host import training_host
from lib_adapters.webui.training.jobs import TrainingJobs
from lib_adapters.webui.training.tab import ELEM_PREFIX, TITLE, TrainTab

_jobs = None


def jobs():
    global _jobs
    if _jobs is None:
        _jobs = TrainingJobs(training_host())  # Forge's own glue on Forge (webui/host.py tells)
    return _jobs


def on_ui_tabs():
    return [(TrainTab(jobs).build(), TITLE, ELEM_PREFIX)]


def on_app_started(_demo, app):
    training_api.register_if_enabled(app, jobs)  # only with --api / --nowebui, as the WebUI's own API


def on_script_unloaded():
    # The reloaded scripts get a new job manager: stop this one's run (it saves a checkpoint that
    # Resume continues from) rather than leave a thread holding the WebUI's queue lock.
    if _jobs is not None:
        _jobs.interrupt()
        _jobs.wait(timeout=120)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(on_script_unloaded)
