"""Optionally log the report (figures and tables) to a W&B run of job type ``report``.

Only when W&B would be online (credentials and a reachable server, decided before
``wandb.init`` so nothing blocks); any failure is reported, never raised: the files
on disk are the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kdexp.core.tracking import resolve_wandb_mode


def publish_report(files: Sequence[Path], tables: Mapping[str, pd.DataFrame], markdown: str, *,
                   project: str = "kdexp", entity: str | None = None, group: str | None = None,
                   config: Mapping[str, Any] | None = None) -> str:
    """Log ``files`` (PNGs) and ``tables`` to W&B when online; returns a line saying what happened."""
    where = f"files are in {Path(files[0]).parent}" if files else "nothing was written"
    mode, reason = resolve_wandb_mode("auto")
    if mode != "online":
        return f"W&B is {mode} ({reason}): the report was not uploaded; {where}."
    try:
        import wandb

        run = wandb.init(project=project, entity=entity, group=group, job_type="report",
                         config=dict(config or {}), settings=wandb.Settings(init_timeout=30, silent=True))
        try:
            run.log({f"report/{Path(f).stem}": wandb.Image(str(f)) for f in files})
            run.log({f"report/table{'_' + name if name else ''}": wandb.Table(dataframe=_loggable(frame))
                     for name, frame in tables.items()})
            run.log({"report/markdown": wandb.Html(f"<pre>{markdown}</pre>")})
            url = getattr(run, "url", None)
        finally:
            run.finish()
        return f"report logged to W&B{f' ({url})' if url else ''}; {where}."
    except Exception as err:  # optional: a W&B problem must never cost the user the report itself
        return f"W&B upload failed ({type(err).__name__}: {err}); {where}."


def _loggable(frame: pd.DataFrame) -> pd.DataFrame:
    """W&B tables take plain columns: objects (tuples, mixed types) become text."""
    return frame.apply(lambda col: col.astype(str) if col.dtype == object else col)
