"""Fake of ``modules/shared_state.py``: ``State``, the job/progress/interrupt record (``shared.state``).

Same fields and methods as v1.10.1 except live previews (``set_current_image`` only stores nothing).
"""
from __future__ import annotations

import datetime
import logging
import time

log = logging.getLogger(__name__)


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo: str | None = None
    time_start: float | None = None
    server_start: float | None = None
    server_command: str | None = None

    def __init__(self):
        self.server_start = time.time()

    @property
    def need_restart(self) -> bool:
        return self.server_command == "restart"

    @need_restart.setter
    def need_restart(self, value: bool) -> None:
        if value:
            self.server_command = "restart"

    def request_restart(self) -> None:
        self.interrupt()
        self.server_command = "restart"

    def skip(self) -> None:
        self.skipped = True
        log.info("Received skip request")

    def interrupt(self) -> None:
        self.interrupted = True
        log.info("Received interrupt request")

    def stop_generating(self) -> None:
        self.stopping_generation = True

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self) -> dict:
        return {
            "skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": self.stopping_generation,
            "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp, "job_no": self.job_no,
            "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps,
        }

    def begin(self, job: str = "(unknown)") -> None:
        """Reset everything for a new job (``job_count`` becomes -1 until processing sets it)."""
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        from modules import devices
        devices.torch_gc()

    def end(self) -> None:
        self.job = ""
        self.job_count = 0
        from modules import devices
        devices.torch_gc()

    def set_current_image(self) -> None:
        """Live previews are not rendered by the stub."""

    def do_set_current_image(self) -> None:
        """Live previews are not rendered by the stub."""

    def assign_current_image(self, image) -> None:
        self.current_image = image
        self.id_live_preview += 1
