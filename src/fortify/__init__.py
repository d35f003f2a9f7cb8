"""fortify: intrinsic adversarial robustness for image classifiers, measured honestly.

Package map (read it like a table of contents):

- :mod:`fortify.data`      datasets as in-memory uint8 tensors with train/val/test splits
- :mod:`fortify.models`    backbones behind a ``create(name, ...)`` registry
- :mod:`fortify.defenses`  plug-in defences (FSR, FPD) and the ``attach`` mechanism
- :mod:`fortify.attacks`   FGSM / PGD (L∞, L2; CE, C&W margin, DLR losses)
- :mod:`fortify.train`     adversarial-training objectives, the shared loop, resume, DDP
- :mod:`fortify.rift`      robust critical fine-tuning
- :mod:`fortify.evaluate`  attack suites, gradient-masking checks, reports and plots
- :mod:`fortify.runs`      run directories and safetensors checkpoints
- :mod:`fortify.cli`       the ``fortify`` command

Every model in fortify maps images in [0, 1] of shape (N, C, H, W) to logits of shape (N, K).
"""

__version__ = "0.1.0"

from fortify.errors import FortifyError

__all__ = ["FortifyError", "__version__"]
