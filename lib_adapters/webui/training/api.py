"""The training web API: start, status, interrupt and resume a run over ``TrainingJobs``.

``register_api(app, jobs)`` is called from ``script_callbacks.on_app_started`` (scripts/adapters_train.py)::

    POST /adapters/v1/train            body: a TrainRequest as JSON -> 200 status | 422 bad field | 400 bad dataset,
                                       no model, a named file not found, nothing to resume | 409 a job is running
    GET  /adapters/v1/train            -> the current (or last) job's status
    POST /adapters/v1/train/interrupt  -> status (the run stops before its next step and saves a checkpoint)
    POST /adapters/v1/train/resume     same body as start: continues from the newest checkpoint of output_name

Every error body is ``{"detail": "<a sentence saying what is wrong and what to do>"}``.

The routes start jobs that read server paths, so they follow the WebUI's own API: they exist only when the
WebUI serves its API (``--api``, or ``--nowebui`` which serves only the API; ``webui.py`` calls
``create_api`` in those cases), otherwise ``register_if_enabled`` says once in the console how to turn them
on (the Train Adapter tab works either way). With ``--api-auth`` they take the same HTTP basic credentials
as ``/sdapi``; with only ``--gradio-auth``/``--gradio-auth-path`` (the UI's login) they take those, read as
``modules.initialize_util.get_gradio_auth_creds`` reads them, so a login-protected WebUI never serves them
to anyone.
"""
from __future__ import annotations

import logging
from pathlib import Path
from secrets import compare_digest
from dataclasses import MISSING
from typing import Callable, List, Optional

from fastapi import Body, Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Extra, Field, create_model

from ...errors import AdapterError, InputError
from ...training.request import REQUEST_FIELDS, Kind, TrainRequest
from .jobs import JobRunningError, TrainingJobs

log = logging.getLogger(__name__)

PREFIX = "/adapters/v1/train"

def _request_model() -> type[BaseModel]:
    """A pydantic model of the request schema (OpenAPI docs only; validation is ``TrainRequest.from_dict``)."""
    spec = {f.name: (f.kind.python_type, Field(... if f.default is MISSING else list(f.default) if f.kind is Kind.STRS
                                               else f.default, title=f.label or None, description=f.help or None))
            for f in REQUEST_FIELDS}

    class Config:
        extra = Extra.forbid

    return create_model("AdaptersTrainRequest", __config__=Config, **spec)


TrainRequestModel = _request_model()


class TrainStatusModel(BaseModel):
    state: str = Field(title="idle, running, finished, interrupted or failed")
    job_id: Optional[str]
    method: Optional[str]
    output_name: Optional[str]
    step: int
    total: int
    losses: List[Optional[float]] = Field(title="loss per optimizer step of this session")
    lr: Optional[float]
    elapsed: float = Field(title="seconds since the job started")
    eta: Optional[float] = Field(title="seconds left (while running)")
    samples: List[str] = Field(title="sample image paths, newest last")
    log: List[str]
    output: Optional[str] = Field(title="the published file (finished or interrupted): in the Lora dir for a LoRA, "
                                        "in models/adapters for a T2I- or IP-Adapter")
    checkpoint: Optional[str] = Field(title="the newest resumable checkpoint (.state)")
    error: Optional[str]


def _cmd_opts():
    try:
        from modules import shared
        return shared.cmd_opts
    except Exception:  # noqa: BLE001  (outside the WebUI: no flags)
        return None


def api_enabled() -> bool:
    """Whether the WebUI serves its API: ``--api``, or ``--nowebui`` (API only)."""
    opts = _cmd_opts()
    return bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


def _pairs(text: str) -> dict[str, str]:
    """``user:pass,user2:pass2`` (whitespace around each pair ignored; a pair without ":" is no credential)."""
    pairs = (item.strip() for item in text.split(","))
    return dict(item.split(":", 1) for item in pairs if ":" in item)


def credentials() -> tuple[bool, dict[str, str]]:
    """(whether the routes need credentials, the accepted user -> password). ``--api-auth`` as ``modules.api.api.Api``
    reads it; else ``--gradio-auth`` and the lines of ``--gradio-auth-path`` as the UI's login reads them. An
    auth file that cannot be read leaves the routes closed to everyone (it would stop the WebUI's own start)."""
    opts = _cmd_opts()
    api_auth = getattr(opts, "api_auth", None)
    if api_auth:
        return True, _pairs(api_auth)
    gradio_auth, auth_path = getattr(opts, "gradio_auth", None), getattr(opts, "gradio_auth_path", None)
    if not gradio_auth and not auth_path:
        return False, {}
    accepted = _pairs(gradio_auth or "")
    if auth_path:
        try:
            with open(auth_path, encoding="utf8") as f:
                for line in f:
                    accepted.update(_pairs(line.strip()))
        except OSError as exc:
            log.warning("adapters training API: cannot read --gradio-auth-path (%s); the routes refuse every "
                        "request", exc)
    return True, accepted


def _auth_dependencies() -> list:
    required, accepted = credentials()
    if not required:
        return []

    def auth(given: HTTPBasicCredentials = Depends(HTTPBasic())):
        if given.username in accepted and compare_digest(given.password, accepted[given.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


def _parse(body) -> TrainRequest:
    try:
        request = TrainRequest.from_dict(body)
        request.to_config(Path("."))  # every range and choice, before anything touches the disk
        return request
    except InputError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


def _start(jobs: TrainingJobs, body, resume: bool) -> dict:
    request = _parse(body)
    try:
        return jobs.start(request, resume=resume).to_dict()
    except JobRunningError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except AdapterError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


_BODY_DOC = ("A training request: dataset_dir and output_name, plus any settings to change from their defaults; "
             "method is lora, t2i_adapter or ip_adapter, and only that method's own fields (rank/alpha/lora_targets/"
             "train_text_encoder, t2i_*, ip_*) may be set.")


OFF_NOTICE = (f"Adapters: the training API ({PREFIX}) is off because the WebUI runs without --api. Start the WebUI "
              "with --api (and --api-auth user:password) to turn it on; the Train Adapter tab works without it.")


def register_if_enabled(app, jobs: Callable[[], TrainingJobs]) -> bool:
    """From ``on_app_started``: the routes when the WebUI serves its API, else one line in the console saying how
    to turn them on. ``jobs`` makes (or returns) the process's job manager; it is called only when registering."""
    if not api_enabled():
        print(OFF_NOTICE, flush=True)
        return False
    register_api(app, jobs())
    return True


def register_api(app, jobs: TrainingJobs) -> None:
    """Add the routes to the WebUI's FastAPI ``app`` (call once, from ``on_app_started``, when the API is on)."""
    dependencies = _auth_dependencies()
    body_schema = {"requestBody": {"required": True, "description": _BODY_DOC,
                                   "content": {"application/json": {"schema": TrainRequestModel.schema()}}}}

    def start(body: dict = Body(..., description=_BODY_DOC)):
        """Validate the request and the dataset, then train in the background; returns the job's status."""
        return _start(jobs, body, resume=False)

    def resume(body: dict = Body(..., description=_BODY_DOC)):
        """Continue the run of ``output_name`` from its newest checkpoint (the same settings as the saved run)."""
        return _start(jobs, body, resume=True)

    def status():
        """The current or last job's status: state, step/total, losses, ETA, samples, log, output, checkpoint."""
        return jobs.status().to_dict()

    def interrupt():
        """Stop the running job before its next step; it saves a checkpoint and its file is published as at the end."""
        return jobs.interrupt().to_dict()

    common = dict(dependencies=dependencies, response_model=TrainStatusModel, tags=["adapters"])
    app.add_api_route(PREFIX, start, methods=["POST"], openapi_extra=body_schema, **common)
    app.add_api_route(PREFIX, status, methods=["GET"], **common)
    app.add_api_route(f"{PREFIX}/interrupt", interrupt, methods=["POST"], **common)
    app.add_api_route(f"{PREFIX}/resume", resume, methods=["POST"], openapi_extra=body_schema, **common)


__all__ = ["register_api", "register_if_enabled", "api_enabled", "credentials", "PREFIX", "TrainRequestModel",
           "TrainStatusModel"]
