"""Model families. Importing this package registers every family and preset.

Each family lives in one file that reads top to bottom (config, layers, model, presets).
"""

from weightsmith.models import bert, convnext, gpt, hybrid, mamba, mamba2, mlp, resnet, rnn, t5, unet, vae, vit  # noqa: F401
