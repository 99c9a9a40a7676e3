"""User hooks (``on_new_best``, ``on_average``, ``on_export``): argv lists, no shell, run off the pipeline.

The event is described in ``CKPTD_*`` environment variables. Each command has the policy's timeout; its output
is captured into the log. A failing, hanging or missing hook is logged and never stops the pipeline.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class HookRunner:
    def __init__(self, log: Any) -> None:
        self.log = log
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptd-hook")  # keeps events in order

    def fire(self, processor: Any, event: str, env: dict[str, str]) -> None:
        ctx = processor.ctx
        commands = getattr(ctx.policy.hooks, event)
        if not commands:
            return
        full_env = {**os.environ, **env, "CKPTD_EVENT": event, "CKPTD_WATCH": ctx.watch.name, "CKPTD_RUN": ctx.run,
                    "CKPTD_OUTPUT": str(ctx.output), "CKPTD_MANIFEST": str(ctx.output / "manifest.json")}
        for argv in commands:
            self._pool.submit(self._run, list(argv), full_env, ctx.policy.hooks.timeout,
                              self.log.bind(watch=ctx.watch.name, run=ctx.run, hook=event))

    @staticmethod
    def _run(argv: list[str], env: dict[str, str], timeout: float, log: Any) -> None:
        try:
            res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            log.error("hook.failed", command=argv, reason=f"timed out after {timeout:g}s",
                      output=_tail((exc.stdout or "") if isinstance(exc.stdout, str) else ""))
            return
        except OSError as exc:
            log.error("hook.failed", command=argv, reason=f"cannot run: {exc.strerror or exc}")
            return
        output = _tail(res.stdout + res.stderr)
        if res.returncode == 0:
            log.info("hook.ok", command=argv, output=output)
        else:
            log.error("hook.failed", command=argv, reason=f"exit code {res.returncode}", output=output)

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


def _tail(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]
