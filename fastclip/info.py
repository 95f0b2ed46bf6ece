"""``python -m fastclip.info``: which backends this machine can run, and why not the others."""

from __future__ import annotations

import importlib.metadata

import torch

import fastclip
from fastclip._dispatch import backend_status
from fastclip._extension import build_description


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    print(f"fastclip {fastclip.__version__}, torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), "
          f"triton {_version('triton')}")
    print(f"fastclip._C: {build_description()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("no CUDA device visible")
    for device in devices:
        print(f"\nbackends for {device} tensors:")
        for name, reason in backend_status(device).items():
            print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")


if __name__ == "__main__":
    main()
