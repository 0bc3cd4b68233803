"""patch_transformers: tinyfuse's kernels inside a Hugging Face Llama, Mistral, Qwen2, Qwen3 or
Granite model.

What each part replaces, and where it hooks in. Every hook is one that transformers
itself calls at run time; none rebuilds or reads Hugging Face's source, so a release
that wraps a forward in a decorator (5.24's `deprecate_kwarg`) or renames a keyword
(`past_key_values` -> `cache`) changes nothing here.

- RMSNorm (every one: the layers', the final norm, Qwen3's q/k norms): rms_norm, as
  the instance's own `forward`, reading only its `weight` and `variance_epsilon`.
- RoPE: the attention calls the function `apply_rotary_pos_emb` of its modeling module,
  looked up by name at each call. tinyfuse puts a stand-in under that name (once per
  family) that runs Hugging Face's own function unless a patched attention instance is
  running: the patched instance's `forward` is its class's forward, unchanged, with the
  instance counted in and out around it. The stand-in then uses `rope` with one cos/sin
  row per token, so position ids (left padding, a KV cache) keep their meaning; other
  layouts (partial rotary, another unsqueeze_dim) go to Hugging Face's function. Two
  threads running a patched and an unpatched model of one family at the same moment may
  see each other's choice, which changes only float rounding: both compute the same
  rotation.
- SwiGLU MLP: swiglu, as the instance's own `forward`. When the input has at least as
  many rows as the MLP's width, gate and up come from one matmul with the two weights
  stacked and the gradient of its [N, 2H] output comes back as one tensor: that saves a
  read of x forward and a read of x plus the add of two input gradients backward (about
  5 N*D elements) for a copy of the two weights (4 H*D), a gain once N exceeds 0.8 H.
  Shorter inputs (decoding) run the two projections and the activation alone.
- The causal-LM loss: with labels and no logits asked for (training, by default), the
  instance's `forward` runs the base model with the caller's own arguments and
  linear_cross_entropy on its last hidden states and the head's weight, never holding
  the [N, V] logits; labels shifted (or `shift_labels`), ignore_index -100 and
  num_items_in_batch ("sum" divided by it) as in Hugging Face's ForCausalLMLoss; Granite's
  logits_scaling divides the logits inside the fused loss (its logit_scale). Granite's
  embedding, residual and attention multipliers are in code this leaves alone. Every
  other call (no labels, skip_logits=False, logits wanted) is the class's forward as it
  is. Hugging Face's `loss_type` lookup is not the hook: it receives the logits already
  formed, which is the cost this part removes.

Why not transformers' kernel hooks (`use_kernel_forward_from_hub` on RMSNorm,
`use_kernelized_func` for `apply_rotary_pos_emb`, the `kernels` package's `kernelize`)
for patch_transformers itself: they reach RMSNorm and RoPE only (these families mark no
MLP and no loss), a kernelized function is one object shared by every attention in the
process (no per-instance patch), and they need the `kernels` package. They are served
too: `kernel_mapping()` gives `kernels.kernelize` tinyfuse's RMSNorm and RoPE from this
local install, with no hub download.

A patched instance keeps its parameters, their names and its state dict (save_pretrained,
an optimizer built before the patch, tied embeddings all keep working); other models are
untouched. Parts that do not fit a model (a GELU MLP, a head with a bias, a norm without
`variance_epsilon`) are left to Hugging Face's code with one warning naming the part and
the reason; a part asked for explicitly (`swiglu=True`) on an instance raises instead.

Where patched and unpatched differ: rms_norm rounds once where Hugging Face rounds the
normalised value before the weight (bf16 results may differ in the last bit), and the
linear_cross_entropy loss comes back in the head's compute dtype (bf16 under bf16
autocast) where Hugging Face upcasts the logits to float32 first.
"""
import importlib
import types
import warnings

import torch
import torch.nn.functional as F

from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

# model_type -> the class-name prefix in transformers.models.<type>.modeling_<type>
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "granite": "Granite"}
PARTS = ("rms_norm", "rope", "swiglu", "linear_cross_entropy")
_IGNORE_INDEX = -100


def _modeling(model_type):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _unsupported(what):
    return TypeError(f"patch_transformers: supported model families are {', '.join(FAMILIES.values())}; "
                     f"got {what}")


# ---- the parts ------------------------------------------------------------------------

def _rms_norm_forward(self, hidden_states):
    # Hugging Face returns weight * normalised in the promoted dtype (float32 weights
    # under autocast give a float32 result): keep that.
    dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
    return rms_norm(hidden_states.to(dtype), self.weight.to(dtype), self.variance_epsilon)


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


def _mlp_forward(self, x):
    gate, up = self.gate_proj, self.up_proj
    rows = x.numel() // max(x.shape[-1], 1)
    if gate.bias is None and up.bias is None and rows >= gate.out_features:
        return self.down_proj(swiglu(F.linear(x, torch.cat((gate.weight, up.weight)))))
    return self.down_proj(swiglu(gate(x), up(x)))


def _causal_lm_loss(hidden, weight, labels, num_items_in_batch=None, ignore_index=_IGNORE_INDEX,
                    shift_labels=None, logit_scale=1.0, **_):
    """Hugging Face's ForCausalLMLoss on (hidden @ weight.T) * logit_scale, without the logits."""
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
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction="mean",
                                    logit_scale=logit_scale)
    loss = linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction="sum",
                                logit_scale=logit_scale)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# The base model's forward takes these positionally too, in this order, in every family.
_BASE_POSITIONAL = 5  # input_ids, attention_mask, position_ids, the cache, inputs_embeds


def _causal_lm_forward(self, *args, labels=None, skip_logits=None, **kwargs):
    """The ForCausalLM forward with the loss through linear_cross_entropy when training
    with labels (skip_logits, default: training with labels; the logits are then None).
    The base model gets the caller's arguments as they are, as the class's forward
    passes them."""
    if skip_logits is None:
        skip_logits = self.training and labels is not None
    if skip_logits and labels is None:
        raise ValueError("skip_logits=True needs labels: without them there is nothing to return")
    if not skip_logits or len(args) > _BASE_POSITIONAL:
        return type(self).forward(self, *args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(*args, **kwargs)
    logit_scale = 1.0 / getattr(self.config, "logits_scaling", 1.0)  # Granite divides its logits by it
    loss = _causal_lm_loss(outputs[0], self.lm_head.weight, labels, logit_scale=logit_scale, **kwargs)
    out = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                 hidden_states=getattr(outputs, "hidden_states", None),
                                 attentions=getattr(outputs, "attentions", None))
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
        return out.to_tuple()
    return out


# ---- planning and applying ------------------------------------------------------------

def _fit(part, module, modeling, prefix):
    """(forward, None) when `part` replaces this module's forward, (None, why not) when the
    module is of the part's kind but the part does not fit it, None otherwise."""
    if part == "rms_norm" and isinstance(module, getattr(modeling, f"{prefix}RMSNorm")):
        if not (isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon")):
            return None, "this RMSNorm has no weight and variance_epsilon to read"
        return _rms_norm_forward, None
    if part == "rope" and isinstance(module, getattr(modeling, f"{prefix}Attention")):
        if not _install_rope_stand_in(modeling):
            return None, f"{modeling.__name__} has no apply_rotary_pos_emb for the attention to call"
        return _attention_forward, None
    if part == "swiglu" and isinstance(module, getattr(modeling, f"{prefix}MLP")):
        act = getattr(getattr(module, "config", None), "hidden_act", None)
        if act not in ("silu", "swish"):
            return None, f"swiglu replaces a SiLU-gated MLP; this one's hidden_act is {act!r}"
        if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
            return None, "this MLP has no gate_proj, up_proj and down_proj"
        return _mlp_forward, None
    if part == "linear_cross_entropy" and isinstance(module, getattr(modeling, f"{prefix}ForCausalLM")):
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
    modeling, prefix = _modeling(model_type), FAMILIES[model_type]
    plan = []
    for module in model.modules():
        done = getattr(module, "_tinyfuse_patched", ())
        for part, required in parts.items():
            found = _fit(part, module, modeling, prefix)
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
    for model_type, prefix in FAMILIES.items():
        try:
            base = getattr(_modeling(model_type), f"{prefix}PreTrainedModel")
        except (ImportError, AttributeError):
            continue  # a transformers without this family
        original = base.__dict__.get("_tinyfuse_original_post_init", base.post_init)

        def post_init(self, _original=original):
            _original(self)
            for module, part, forward in _plan(self, {part: None for part in parts}):
                _apply(module, part, forward)

        base._tinyfuse_original_post_init = original
        base.post_init = post_init


def _apply(module, part, forward):
    module.forward = forward
    module._tinyfuse_patched = (*getattr(module, "_tinyfuse_patched", ()), part)


def patch_transformers(model=None, *, rms_norm=None, rope=None, swiglu=None, linear_cross_entropy=None):
    """Run a Hugging Face Llama, Mistral, Qwen2, Qwen3 or Granite model on tinyfuse's kernels.

    Each part is None (default: wherever it fits, with a warning where it does not),
    True (required: raise if it does not fit) or False (left out). With a model
    instance, patches that instance in place (its weights are kept, not copied) and
    returns it; calling again is harmless. With no instance, patches the classes, so
    every such model built afterwards is patched wherever each part fits. Any other model
    raises an error naming the supported families, with nothing changed. See the module
    docstring for what each part replaces.
    """
    chosen = {part: setting for part, setting in zip(PARTS, (rms_norm, rope, swiglu, linear_cross_entropy))
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
