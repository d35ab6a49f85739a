"""Write the bytecode of everything the project imports, once, at install (``make install`` runs it).

``make install`` skips pip's bytecode pass over the whole 6 GB environment (``--no-compile``: minutes), and many
container images set ``PYTHONDONTWRITEBYTECODE=1``, so without this every process start recompiled the modules it
imports (``python -m experiments.run --help``: about 24 s of CPU instead of about 9 s here). This imports every
project module and the classes the project imports lazily (inside functions), with bytecode writing switched on
for this process only; later processes read the cached ``.pyc`` files even where writing stays forbidden.

    python -m experiments.precompile
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = False  # noqa: E402  (before anything below is imported)

import importlib  # noqa: E402
import pkgutil  # noqa: E402
import time  # noqa: E402

PACKAGES = ("datamodules", "lightning_modules", "callbacks", "experiments")
LAZY = {  # module -> names imported inside functions somewhere in the project
    "diffusers": ["UNet2DConditionModel", "AutoencoderKL", "StableDiffusionXLPipeline", "DDPMScheduler",
                  "EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "PriorTransformer"],
    "transformers": ["CLIPVisionModelWithProjection", "CLIPTextModelWithProjection", "CLIPTextModel",
                     "CLIPTokenizer", "AutoTokenizer", "CLIPImageProcessor"],
}
MODULES = ("lightning.pytorch.cli", "jsonargparse", "attrs", "peft", "peft.tuners.lora", "torchvision.models", "torchvision.models.feature_extraction", "lpips",
           "skimage.metrics", "sklearn.linear_model", "sklearn.decomposition", "scipy.stats", "nibabel", "h5py",
           "matplotlib.pyplot", "tensorboard", "safetensors.torch", "webdataset", "torchmetrics")


def main(argv: list[str] | None = None) -> int:
    start, failed = time.perf_counter(), []
    names = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names += [m.name for m in pkgutil.walk_packages(root.__path__, f"{package}.")
                  if not m.name.endswith("__main__")]
    for name in [*names, *MODULES]:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional extra that is not installed: nothing to compile
            failed.append(f"{name} ({type(exc).__name__})")
    for module, attributes in LAZY.items():
        imported = importlib.import_module(module)
        for attribute in attributes:
            getattr(imported, attribute)
    print(f"precompiled the imports of {len(names)} project modules in {time.perf_counter() - start:.0f} s"
          + (f"; not importable here: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
