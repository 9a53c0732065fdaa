"""polyquant_mamba_demo: an example third-party polyquant plugin (see README.md).

Light on purpose: discovery imports ``polyquant_mamba_demo.spec``, and with it this file, so nothing here may
import torch. The methods live in ``polyquant_mamba_demo.methods``, the model in ``polyquant_mamba_demo.model``.
"""

__version__ = "0.1"
