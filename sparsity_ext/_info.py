"""sparsity_ext.info(): what is built, and which backend each op runs on here."""
from __future__ import annotations

import platform

import torch

from . import _backend, _extension


def info(as_text: bool = True):
    """Describe the build and the dispatch: a printable text, or (as_text=False) a dict. For every op and
    backend it says what runs: the backend's kernel, the reference's torch ops, a named composite of the
    backend's other ops (sparsity_ext._composites), or why nothing can (not built)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    auto = {}
    for op in _backend.backend_table():
        row = {}
        for dev in devices:
            try:
                row[dev] = _backend.resolve(op, torch.device(dev), torch.float32)[0]
            except RuntimeError as exc:
                row[dev] = f"error: {exc}"
        auto[op] = row
    data = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": "loaded" if _extension.load_error is None else f"missing ({_extension.load_error})",
        "backend_in_force": _backend.current_backend(),
        "backends": _backend.backend_table(),
        "fp32_runs_on": auto,
    }
    if not as_text:
        return data
    lines = [f"sparsity_ext on Python {data['python']}, torch {data['torch']} (CUDA {data['torch_cuda']}), "
             f"GPU: {data['gpu']}",
             f"compiled extension: {data['extension']}",
             f"backend in force: {data['backend_in_force']}",
             "", f"{'op':24s} " + " ".join(f"{b:>12s}" for b in _backend.BACKENDS) + "   fp32 runs on"]
    composites, reasons = {}, {}
    for op, row in data["backends"].items():
        cells = []
        for cell in row.values():
            kind, _, detail = cell.partition(": ")
            if kind == "composite":
                composites.setdefault(detail, f"c{len(composites) + 1}")
                kind = f"composite {composites[detail]}"
            elif kind == "not built":
                reasons.setdefault(detail, f"n{len(reasons) + 1}")
                kind = f"no ({reasons[detail]})"
            cells.append(f"{kind:>12s}")
        where = ", ".join(f"{dev}->{b}" for dev, b in auto[op].items())
        lines.append(f"{op:24s} " + " ".join(cells) + f"   {where}")
    lines += [""] + [f"{tag}: {what}" for what, tag in composites.items()]
    lines += [f"{tag}: not built: {why}" for why, tag in reasons.items()]
    return "\n".join(lines)
