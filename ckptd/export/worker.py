"""Entry point of the export subprocess: ``python -m ckptd.export.worker REQUEST.json RESULT.json``.

Always writes a result file (ok / partial / failed with the reason), so the parent never has to parse a
traceback. A crash or a kill leaves no result file: the parent reports that instead.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from ckptd.errors import ExportError
from ckptd.export.request import ExportRequest, ExportResult


def main(argv: list[str]) -> int:
    req = ExportRequest.from_json(Path(argv[0]).read_text())
    result_path = Path(argv[1])
    try:
        from ckptd.export.coreml import export_coreml

        result = export_coreml(req)
    except ExportError as exc:
        result = ExportResult(status="failed", reason=str(exc), verification=getattr(exc, "verification", {}))
    except Exception as exc:  # report anything, with the traceback tail  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()
        result = ExportResult(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500],
                              verification={"traceback_tail": tb[-6:]})
    result_path.write_text(result.to_json())
    return 0


if __name__ == "__main__":
    from ckptd.export.runner import die_with_parent

    die_with_parent()  # first: a parent killed with kill -9 must not leave this conversion running
    sys.exit(main(sys.argv[1:]))
