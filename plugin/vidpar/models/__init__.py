"""diffusers' video transformers on any vidpar layout.

Public API:

* :func:`parallelize(model, *, compile=False) <vidpar.models.parallelize.parallelize>`:
  called inside a layout, prepares a diffusers video transformer of a known family
  (:data:`SUPPORTED_MODELS`) for it in place, from the family's plan, and returns it (sequence parallel over
  sp = ulysses × ring, heads and FFN over tp, weights under their diffusers names, the
  forward signature and the outputs of the single-device model). Outside any layout it
  changes nothing (``compile`` still compiles the repeated blocks).
* :data:`SUPPORTED_MODELS`: the class names it knows; :data:`PLANS` their plans
  (:class:`~vidpar.models.plan.ModelPlan`, with
  :class:`~vidpar.models.token_sharding.Split` and
  :class:`~vidpar.models.token_sharding.Gather` for the tokens): add one to add a family.
* :func:`parallelize_vae(vae, group=None) <vidpar.models.parallel_vae.parallelize_vae>`:
  a diffusers ``AutoencoderKLWan`` whose ``encode``/``decode`` split the rows over the
  replica's ranks (exactly: halo exchange, gathered attention) and return the whole result.
* :func:`peft_to_adapter <vidpar.nn.lora_peft.peft_to_adapter>` turns a diffusers/PEFT LoRA
  file into the adapter that :class:`vidpar.nn.lora.LoraManager` merges under any tp.

``import vidpar.models`` does not import diffusers: the plans work on the model objects
they are given.
"""

from vidpar.models.parallel_vae import parallelize_vae
from vidpar.models.parallelize import PLANS, SUPPORTED_MODELS, parallelize
from vidpar.models.plan import ModelPlan
from vidpar.models.token_sharding import Gather, Split
from vidpar.nn.lora_peft import peft_to_adapter

__all__ = [
    "PLANS",
    "SUPPORTED_MODELS",
    "Gather",
    "ModelPlan",
    "Split",
    "parallelize",
    "parallelize_vae",
    "peft_to_adapter",
]
