"""The README's usage example runs as written (docs match the code)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from dataflow_redis import ControlPlane

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs(redis_url, capsys):
    code = re.search(r"## Use\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    run_id = f"readme-{uuid.uuid4().hex[:8]}"
    code = code.replace("redis://localhost:6379/0", redis_url).replace('"run-1"', f'"{run_id}"')
    try:
        exec(compile(code, str(README), "exec"), {})
        status = ControlPlane.from_url(redis_url, run_id=run_id).status()
        assert status["samples_acked"] == 1 and status["checkpoint_global_step"] == 1
        assert status["backpressure"]["resident_bytes"] == 3 << 30
        assert f"'run_id': '{run_id}'" in capsys.readouterr().out
    finally:
        ControlPlane.from_url(redis_url, run_id=run_id).delete()
