"""What gpufit runs on: the active backend, torch and CUDA versions, compiled architectures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class Info:
    gpufit: str
    backend: str
    backend_detail: str
    compiled_archs: str
    torch: str
    torch_cuda: str | None
    cudnn: int | None
    cuda_available: bool
    gpus: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            ("gpufit", self.gpufit),
            ("backend", f"{self.backend} ({self.backend_detail})"),
            ("compiled archs", self.compiled_archs or "none (no CUDA kernels)"),
            ("torch", self.torch),
            ("torch CUDA", self.torch_cuda or "none (CPU build)"),
            ("cuDNN", str(self.cudnn) if self.cudnn else "none"),
            ("GPUs", ", ".join(self.gpus) if self.gpus else "none visible"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def info() -> Info:
    from gpufit import __version__, ops

    backend = ops.BACKEND
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return Info(
        gpufit=__version__,
        backend=backend.label,
        backend_detail=backend.detail,
        compiled_archs=backend.cuda_archs,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=torch.cuda.is_available(),
        gpus=gpus,
    )
