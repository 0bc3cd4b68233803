"""patch_transformers: tinyfuse's kernels inside a Hugging Face causal LM of eleven families.

What each family gets (FAMILIES below holds the differences as data):

| family (model_type)      | on tinyfuse                                   | left to Hugging Face's code            |
|--------------------------|-----------------------------------------------|----------------------------------------|
| Llama, Mistral, Qwen2    | norms, RoPE, SwiGLU MLP, loss                 | attention, embedding                   |
| Qwen3                    | as Llama, with the q/k norms                  | attention, embedding                   |
| Granite                  | as Llama; logits_scaling inside the loss      | embedding, residual and attention      |
|                          |                                               | multipliers                            |
| Gemma                    | (1 + weight) norms, GeGLU MLP, RoPE, loss     | the sqrt(hidden) embedding scale       |
| Gemma 2                  | as Gemma, with the pre/post-feedforward norms | the scaled embedding, the attention's  |
|                          | and the final logit soft cap inside the loss  | soft cap and sliding window            |
| Gemma 3 (text)           | as Gemma 2, with the q/k norms                | the scaled embedding, sliding window   |
| Phi-3                    | norms, RoPE, SwiGLU on its fused gate_up_proj,| its fused qkv_proj (a plain matmul)    |
|                          | loss                                          | and partial rotary (Phi-4-mini)        |
| SmolLM3                  | as Llama; RoPE in the layers that have it     | attention                              |
| OLMo 2                   | norms incl. post-norms and the whole-         | attention                              |
|                          | projection q/k norms, RoPE, SwiGLU, loss      |                                        |

Gemma 3's multimodal model (model_type "gemma3") is not served on an instance; after a
class patch its text model is patched as Gemma 3 (text) is, and its loss and vision tower
stay Hugging Face's.

What each part replaces, and where it hooks in. Every hook is one that transformers
itself calls at run time; none rebuilds or reads Hugging Face's source, so a release
that wraps a forward in a decorator (5.24's `deprecate_kwarg`) or renames a keyword
(`past_key_values` -> `cache`) changes nothing here.

- RMSNorm (every one: the layers', the post-norms, the final norm, the q/k norms): rms_norm,
  as the instance's own `forward`, reading only its `weight` and its epsilon
  (`variance_epsilon`, or Gemma's `eps`). Gemma's (1 + weight) is the kernel's offset.
  The result's dtype is Hugging Face's: the promoted one where the family multiplies the
  rounded normalised value by the weight (Llama), the input's where it rounds the product
  (Gemma, OLMo 2).
- RoPE: the attention calls the function `apply_rotary_pos_emb` of its modeling module,
  looked up by name at each call. tinyfuse puts a stand-in under that name (once per
  family) that runs Hugging Face's own function unless a patched attention instance is
  running: the patched instance's `forward` is its class's forward, unchanged, with the
  instance counted in and out around it. The stand-in then uses `rope` with one cos/sin
  row per token, so position ids (left padding, a KV cache) keep their meaning; other
  layouts (partial rotary, another unsqueeze_dim) go to Hugging Face's function. A layer
  that calls no RoPE (SmolLM3's NoPE layers) runs none. Two threads running a patched and
  an unpatched model of one family at the same moment may see each other's choice, which
  changes only float rounding: both compute the same rotation.
- The gated MLP: swiglu (a SiLU gate) or geglu (a tanh-approximated GELU gate, Gemma's
  `gelu_pytorch_tanh`), as the instance's own `forward`. When the input has at least as
  many rows as the MLP's width, gate and up come from one matmul with the two weights
  stacked and the gradient of its [N, 2H] output comes back as one tensor: that saves a
  read of x forward and a read of x plus the add of two input gradients backward (about
  5 N*D elements) for a copy of the two weights (4 H*D), a gain once N exceeds 0.8 H.
  Shorter inputs (decoding) run the two projections and the activation alone. Phi-3's
  projection is already one (`gate_up_proj`): its output goes to the packed form as is.
- The causal-LM loss: with labels and no logits asked for (training, by default), the
  instance's `forward` runs the base model with the caller's own arguments and
  linear_cross_entropy on its last hidden states and the head's weight, never holding
  the [N, V] logits; labels shifted (or `shift_labels`), ignore_index -100 and
  num_items_in_batch ("sum" divided by it) as in Hugging Face's ForCausalLMLoss. Granite's
  logits_scaling (the logits are divided by it) is the fused loss's logit_scale, Gemma 2/3's
  final_logit_softcapping its softcap. Every other call (no labels, skip_logits=False,
  logits wanted) is the class's forward as it is. Hugging Face's `loss_type` lookup is not
  the hook: it receives the logits already formed, which is the cost this part removes.

Why not transformers' kernel hooks (`use_kernel_forward_from_hub` on RMSNorm,
`use_kernelized_func` for `apply_rotary_pos_emb`, the `kernels` package's `kernelize`)
for patch_transformers itself: they reach RMSNorm and RoPE only (these families mark no
MLP and no loss), a kernelized function is one object shared by every attention in the
process (no per-instance patch), and they need the `kernels` package. They are served
too: `kernel_mapping()` gives `kernels.kernelize` tinyfuse's RMSNorm and RoPE from this
local install, with no hub download.

A patched instance keeps its parameters, their names and its state dict (save_pretrained,
an optimizer built before the patch, tied embeddings all keep working); other models are
untouched. Parts that do not fit a model (an exact-GELU MLP, a head with a bias, a norm
without an epsilon) are left to Hugging Face's code with one warning naming the part and
the reason; a part asked for explicitly (`swiglu=True`) on an instance raises instead.

Where patched and unpatched differ: rms_norm rounds once where Llama's norm rounds the
normalised value before the weight (bf16 results may differ in the last bit), and the
linear_cross_entropy loss comes back in the head's compute dtype (bf16 under bf16
autocast) where Hugging Face upcasts the logits to float32 first.
"""
import functools
import importlib
import types
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import geglu, swiglu


@dataclass(frozen=True)
class Family:
    """How one family differs from Llama, as far as the patched parts are concerned."""
    module: str                          # transformers.models.<module>.modeling_<module>
    prefix: str                          # its classes' name prefix
    norm_offset: float = 0.0             # Gemma's norms scale by (offset + weight)
    norm_rounds_product: bool = False    # (weight * normalised).to(x.dtype), not weight * normalised.to(x.dtype)
    activation: str = "hidden_act"       # the config key the MLP's activation is named under
    logit_divisor: Optional[str] = None  # the config key the logits are divided by (Granite)
    softcap: Optional[str] = None        # the config key of the final logits' soft cap (Gemma 2/3)


_GEMMA = dict(norm_offset=1.0, norm_rounds_product=True)
_GEMMA_2 = dict(_GEMMA, activation="hidden_activation", softcap="final_logit_softcapping")
# model_type -> Family
FAMILIES = {
    "llama": Family("llama", "Llama"),
    "mistral": Family("mistral", "Mistral"),
    "qwen2": Family("qwen2", "Qwen2"),
    "qwen3": Family("qwen3", "Qwen3"),
    "granite": Family("granite", "Granite", logit_divisor="logits_scaling"),
    "gemma": Family("gemma", "Gemma", **_GEMMA),
    "gemma2": Family("gemma2", "Gemma2", **_GEMMA_2),
    "gemma3_text": Family("gemma3", "Gemma3", **_GEMMA_2),
    "phi3": Family("phi3", "Phi3"),
    "smollm3": Family("smollm3", "SmolLM3"),
    "olmo2": Family("olmo2", "Olmo2", norm_rounds_product=True),
}
PARTS = ("rms_norm", "rope", "swiglu", "geglu", "linear_cross_entropy")
# the MLP's activation (as transformers names it) -> the part and op that replace its gated MLP
_GATES = {"silu": ("swiglu", swiglu), "swish": ("swiglu", swiglu), "gelu_pytorch_tanh": ("geglu", geglu)}
_IGNORE_INDEX = -100


def _modeling(family):
    return importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")


def _unsupported(what):
    names = ", ".join(family.prefix for family in FAMILIES.values())
    return TypeError(f"patch_transformers: supported model families are {names}; got {what}")


# ---- the parts ------------------------------------------------------------------------

def _norm_eps(module):
    """An RMSNorm's epsilon: `variance_epsilon` (Llama and most) or `eps` (Gemma)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _rms_norm_forward(self, hidden_states, offset=0.0, rounds_product=False):
    # Llama returns weight * normalised in the promoted dtype (float32 weights under
    # autocast give a float32 result); Gemma and OLMo 2 return the input's dtype.
    if rounds_product:
        return rms_norm(hidden_states, self.weight, _norm_eps(self), offset)
    dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
    return rms_norm(hidden_states.to(dtype), self.weight.to(dtype), _norm_eps(self), offset)


def _rope_fits(q, cos, unsqueeze_dim):
    """Hugging Face's layout that `rope` takes: q [B, H, T, D], cos/sin [B or 1, T, D] whose
    two halves are equal (the rotate_half convention)."""
    return unsqueeze_dim == 1 and cos.dim() == 3 and cos.shape[-1] == q.shape[-1] and q.shape[-1] % 2 == 0


def _tinyfuse_rope(q, k, cos, sin):
    half = q.shape[-1] // 2
    q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos[..., :half], sin[..., :half], interleaved=False)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


class _RopeScope:
    """How many patched attention forwards are running (nested calls count each)."""
    depth = 0


def _rope_stand_in(original):
    """What the modeling module's `apply_rotary_pos_emb` becomes: Hugging Face's function,
    except inside a patched attention instance."""
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _RopeScope.depth > 0 and _rope_fits(q, cos, unsqueeze_dim):
            return _tinyfuse_rope(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.tinyfuse_original = original
    return apply_rotary_pos_emb


def _install_rope_stand_in(modeling):
    """The stand-in under the modeling module's `apply_rotary_pos_emb`, installed once;
    False when the module has no such function (the attention computes RoPE otherwise)."""
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if not hasattr(current, "tinyfuse_original"):
        modeling.apply_rotary_pos_emb = _rope_stand_in(current)
    return True


def _attention_forward(self, *args, **kwargs):
    """The class's own forward, with this instance counted as running (see _RopeScope)."""
    _RopeScope.depth += 1
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _RopeScope.depth -= 1


def _mlp_forward(self, x, gated):
    gate, up = self.gate_proj, self.up_proj
    rows = x.numel() // max(x.shape[-1], 1)
    if gate.bias is None and up.bias is None and rows >= gate.out_features:
        return self.down_proj(gated(F.linear(x, torch.cat((gate.weight, up.weight)))))
    return self.down_proj(gated(gate(x), up(x)))


def _fused_mlp_forward(self, x, gated):
    """Phi-3's MLP: gate_up_proj's [..., 2H] output holds gate then up, the packed form."""
    return self.down_proj(gated(self.gate_up_proj(x)))


def _causal_lm_loss(hidden, weight, labels, num_items_in_batch=None, ignore_index=_IGNORE_INDEX,
                    shift_labels=None, logit_scale=1.0, softcap=None, **_):
    """Hugging Face's ForCausalLMLoss on softcap(hidden @ weight.T * logit_scale), without the logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the dtype the head's matmul would run in
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        hidden = hidden.to(weight.dtype)
    target = shift_labels.reshape(-1).to(hidden.device)
    options = dict(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, weight, target, reduction="mean", **options)
    loss = linear_cross_entropy(hidden, weight, target, reduction="sum", **options)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# The base model's forward takes these positionally too, in this order, in every family.
_BASE_POSITIONAL = 5  # input_ids, attention_mask, position_ids, the cache, inputs_embeds


def _causal_lm_forward(self, *args, labels=None, skip_logits=None, logits_to_keep=0, **kwargs):
    """The ForCausalLM forward with the loss through linear_cross_entropy when training
    with labels (skip_logits, default: training with labels; the logits are then None).
    The base model gets the caller's arguments as they are, as the class's forward
    passes them. logits_to_keep is named in the signature because generate() reads the
    signature to decide whether to ask for the last position's logits only."""
    if skip_logits is None:
        skip_logits = self.training and labels is not None
    if skip_logits and labels is None:
        raise ValueError("skip_logits=True needs labels: without them there is nothing to return")
    if not skip_logits or len(args) > _BASE_POSITIONAL:
        return type(self).forward(self, *args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    outputs = self.model(*args, **kwargs)
    family = FAMILIES[self.config.model_type]
    divisor = getattr(self.config, family.logit_divisor) if family.logit_divisor else 1.0
    softcap = getattr(self.config, family.softcap) if family.softcap else None
    loss = _causal_lm_loss(outputs[0], self.lm_head.weight, labels, logit_scale=1.0 / divisor, softcap=softcap,
                           **kwargs)
    out = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                 hidden_states=getattr(outputs, "hidden_states", None),
                                 attentions=getattr(outputs, "attentions", None))
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
        return out.to_tuple()
    return out


# ---- planning and applying ------------------------------------------------------------

def _fit(part, module, modeling, family):
    """(forward, None) when `part` replaces this module's forward, (None, why not) when the
    module is of the part's kind but the part does not fit it, None otherwise."""
    def of(kind):  # () when this transformers' family has no such class: isinstance is then False
        return getattr(modeling, f"{family.prefix}{kind}", ())

    if part == "rms_norm" and isinstance(module, of("RMSNorm")):
        if not (isinstance(getattr(module, "weight", None), torch.Tensor) and _norm_eps(module) is not None):
            return None, "this RMSNorm has no weight and epsilon to read"
        return functools.partial(_rms_norm_forward, offset=family.norm_offset,
                                 rounds_product=family.norm_rounds_product), None
    if part == "rope" and isinstance(module, of("Attention")):
        if not _install_rope_stand_in(modeling):
            return None, f"{modeling.__name__} has no apply_rotary_pos_emb for the attention to call"
        return _attention_forward, None
    if part in ("swiglu", "geglu") and isinstance(module, of("MLP")):
        act = getattr(getattr(module, "config", None), family.activation, None)
        gate_part, gated = _GATES.get(act, (None, None))
        if gate_part is None:  # neither part fits: said once, under swiglu
            return (None, f"swiglu and geglu replace SiLU- and tanh-GELU-gated MLPs; this one's "
                          f"{family.activation} is {act!r}") if part == "swiglu" else None
        if part != gate_part:
            return None
        if all(hasattr(module, name) for name in ("gate_up_proj", "down_proj")):
            return functools.partial(_fused_mlp_forward, gated=gated), None
        if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
            return None, "this MLP has no gate_proj, up_proj and down_proj (nor gate_up_proj)"
        return functools.partial(_mlp_forward, gated=gated), None
    if part == "linear_cross_entropy" and isinstance(module, of("ForCausalLM")):
        head = getattr(module, "lm_head", None)
        if not isinstance(head, torch.nn.Linear) or not hasattr(module, "model"):
            return None, "this model has no lm_head Linear and base model to read"
        if head.bias is not None:
            return None, "linear_cross_entropy takes a head without bias"
        return _causal_lm_forward, None
    return None


_WARNED = set()


def _plan(model, parts):
    """[(module, part, forward)] for every module of `model` that a chosen part replaces
    and that is not patched yet. parts: {part: True (required) or None (where it fits)}.
    Raises before anything changes for an unsupported model or a required part that
    does not fit; warns once for a part left to Hugging Face."""
    from transformers import PreTrainedModel

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in FAMILIES:
        raise _unsupported(f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else ""))
    family = FAMILIES[model_type]
    modeling = _modeling(family)
    plan = []
    for module in model.modules():
        done = getattr(module, "_tinyfuse_patched", ())
        for part, required in parts.items():
            found = _fit(part, module, modeling, family)
            if found is None or part in done:
                continue
            forward, why = found
            if forward is not None:
                plan.append((module, part, types.MethodType(forward, module)))
            elif required:
                raise TypeError(f"patch_transformers: {why}: patch with {part}=False")
            elif (type(module), part, why) not in _WARNED:
                _WARNED.add((type(module), part, why))
                warnings.warn(f"patch_transformers: {part} left to Hugging Face's code in {type(module).__name__}: "
                              f"{why}", stacklevel=3)
    return plan


def _patch_classes(parts):
    """Patch every model of the families built from now on: each family's
    PreTrainedModel.post_init (the last step of every model's __init__) patches the
    instance it finishes, each part where it fits. Calling again replaces the chosen
    parts, never stacks."""
    for family in FAMILIES.values():
        try:
            base = getattr(_modeling(family), f"{family.prefix}PreTrainedModel")
        except (ImportError, AttributeError):
            continue  # a transformers without this family
        original = base.__dict__.get("_tinyfuse_original_post_init", base.post_init)

        def post_init(self, _original=original):
            _original(self)
            if getattr(self.config, "model_type", None) not in FAMILIES:
                return  # a model of a family's base class that is not served (Gemma 3's multimodal one)
            for module, part, forward in _plan(self, {part: None for part in parts}):
                _apply(module, part, forward)

        base._tinyfuse_original_post_init = original
        base.post_init = post_init


def _apply(module, part, forward):
    module.forward = forward
    module._tinyfuse_patched = (*getattr(module, "_tinyfuse_patched", ()), part)


def patch_transformers(model=None, *, rms_norm=None, rope=None, swiglu=None, geglu=None, linear_cross_entropy=None):
    """Run a Hugging Face causal LM of the families in FAMILIES (Llama, Mistral, Qwen2/3,
    Granite, Gemma 1/2/3, Phi-3, SmolLM3, OLMo 2) on tinyfuse's kernels.

    Each part is None (default: wherever it fits, with a warning where it does not),
    True (required: raise if it does not fit) or False (left out). With a model
    instance, patches that instance in place (its weights are kept, not copied) and
    returns it; calling again is harmless. With no instance, patches the classes, so
    every such model built afterwards is patched wherever each part fits. Any other model
    raises an error naming the supported families, with nothing changed. See the module
    docstring for what each part replaces.
    """
    chosen = {part: setting for part, setting in zip(PARTS, (rms_norm, rope, swiglu, geglu, linear_cross_entropy))
              if setting is not False}
    if model is None:
        _patch_classes(chosen)
        return None
    for module, part, forward in _plan(model, chosen):
        _apply(module, part, forward)
    return model


# ---- the `kernels` package's path ------------------------------------------------------

class _KernelsRMSNorm(torch.nn.Module):
    """tinyfuse's RMSNorm as a `kernels` layer: stateless, reading the module it replaces."""
    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states):
        return _rms_norm_forward(self, hidden_states)


class _KernelsRotary(torch.nn.Module):
    """tinyfuse's RoPE as a `kernels` layer for the function `apply_rotary_pos_emb`; other
    layouts rotate as Hugging Face's function does."""
    has_backward = True
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        if _rope_fits(q, cos, unsqueeze_dim):
            return _tinyfuse_rope(q, k, cos, sin)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rotate_half(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class _LocalLayer:
    """A `kernels` repository (anything with load() returning a layer class) that is this
    install's own class: nothing is downloaded."""

    def __init__(self, layer):
        self.layer = layer

    def load(self):
        return self.layer

    def __repr__(self):
        return f"tinyfuse {self.layer.__name__}"


def kernel_mapping(devices=("cuda", "cpu")):
    """The mapping for the `kernels` package: `kernels.use_kernel_mapping(kernel_mapping())`
    then `kernels.kernelize(model, mode=Mode.TRAINING)` (or Mode.INFERENCE, with
    `| Mode.TORCH_COMPILE` as wanted) puts tinyfuse's RMSNorm and RoPE into any model
    whose layers transformers marks "RMSNorm" and "rotary_pos_emb". The RoPE function is
    one object per modeling module, so kernelizing it reaches every model of that family
    in the process; the MLP and the loss have no such mark (patch_transformers serves
    them). "cpu" runs in Triton's interpreter (tests)."""
    return {name: {device: _LocalLayer(layer) for device in devices}  # one layer for every mode
            for name, layer in (("RMSNorm", _KernelsRMSNorm), ("rotary_pos_emb", _KernelsRotary))}
