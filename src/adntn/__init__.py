"""adntn: compress pretrained CNN layers into automatically differentiable nonlinear tensor networks.

The library is the product; the ``adntn`` command is a thin shell over these calls::

    import torch, torchvision, adntn

    vgg = torchvision.models.vgg11(num_classes=10)
    result = adntn.compress(vgg, layers=["fc6", "fc7"], arch="ttn", ratio=200, steps=20)
    result.model(torch.randn(1, 3, 224, 224))        # the model with generated layers
    result.report["layers"][0]["ratio"]              # >= 200
    result.save("vgg11.adntn")                       # what `adntn compress` writes
    model = adntn.load("vgg11.adntn")                # the compressed model, no dense weight held
    adntn.export_onnx("vgg11.adntn", "vgg11.onnx")   # compressed layers stay compressed
    state = adntn.expand("vgg11.adntn")              # dense state_dict (or expand(dir, out=PATH))

Any module works when its layers are named by module path (``layers=["0"]`` for the first layer
of an ``nn.Sequential``). Keyword options carry the CLI's names (``steps``, ``lr``, ``seed``,
``activation``, ``bond_dim``, ``data``, ``epochs``, ...; see :class:`CompressOptions`). Every
error the caller can cause is an :class:`AdntnError` with a one-sentence message.

For composing your own: a :class:`GeneratorSpec` (``adntn.networks.budget.spec_for_ratio``) gives a
generator through ``adntn.networks.build(spec)`` or ``adntn.networks.from_weight(spec, weight)``,
and :class:`GeneratedLinear` / :class:`GeneratedConv2d` put one in a model.
"""

from adntn.core.spec import GeneratorSpec
from adntn.errors import AdntnError
from adntn.models.layers import GeneratedConv2d, GeneratedLinear, dense_weights
from adntn import networks
from adntn.pipeline.compress import Compressed, compress
from adntn.pipeline.expand import expand
from adntn.pipeline.export import export_onnx
from adntn.pipeline.load import load, set_schedule
from adntn.pipeline.options import CompressOptions
from adntn.progress import Progress
from adntn.version import __version__

__all__ = ["AdntnError", "Compressed", "CompressOptions", "GeneratedConv2d", "GeneratedLinear", "GeneratorSpec",
           "Progress", "__version__", "compress", "dense_weights", "expand", "export_onnx", "load", "networks",
           "set_schedule"]
